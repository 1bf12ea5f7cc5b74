"""Whole-slide images: reading pyramids, finding tissue, segmenting in bounded memory, writing
OME-Zarr labels / QuPath GeoJSON / object tables, resumable runs and a dask.distributed runner.

    reader.py      open_slide(path) -> Slide (lazy levels, µm/px) for SVS, NDPI, SCN, BIF,
                   Philips, OME-TIFF, generic tiled pyramids (tifffile), others via openslide
    tissue.py      tissue mask on a low-resolution level (saturation, Otsu, cleanup, pen rejection)
    pipeline.py    segment_slide: chunks over tissue -> src_models.chunked_instances -> writers
    zarr_labels.py / geojson.py / object_table.py   the outputs
    runtime.py     the model runner per process: torch or the exported graph, one export shared
    cluster.py     many slides on dask.distributed
"""
