"""napari readers: dropping a DCA `.safetensors` checkpoint makes it the current model (no layers);
opening a whole-slide image (SVS, NDPI, SCN, BIF, OME-TIFF / pyramidal TIFF, openslide formats)
gives a lazy multiscale layer and its tissue mask. Also the Labels -> QuPath GeoJSON writer."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def get_reader(path):
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if not str(path).lower().endswith(".safetensors"):
        return None
    if not _has_card(Path(path)):
        return None  # some other safetensors file: let another reader have it
    return read_checkpoint


def _has_card(path: Path) -> bool:
    try:
        from safetensors import safe_open

        from src_models.checkpoints import CARD_METADATA_KEY
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return CARD_METADATA_KEY in meta or path.with_suffix(".json").exists()
    except Exception:
        return False


def read_checkpoint(path):
    """Loads the checkpoint into the current viewer's napari-dca state; returns napari's
    "read, but no layers" sentinel [(None,)]."""
    import napari
    from napari.utils.notifications import show_error, show_info

    from ._widgets._state import get_state, load_model_into

    path = path[0] if isinstance(path, list) else path
    viewer = napari.current_viewer()
    if viewer is None:
        show_error("Open a napari viewer first, then drop the checkpoint on it.")
        return [(None,)]
    state = get_state(viewer)
    try:
        load_model_into(state, path, device=state.device or "cpu")
    except Exception as err:  # CheckpointError and friends: tell the user, don't raise into napari
        show_error(f"Could not load {Path(path).name}: {err}. Pick a napari-dca checkpoint "
                   f"(.safetensors with a model card) in the Model widget.")
        return [(None,)]
    show_info(f"napari-dca: loaded {Path(path).name} ({state.card.architecture}, task "
              f"{state.card.task}) as the current model. Open Plugins > DCA segmentation > Segment.")
    return [(None,)]


# ----------------------------------------------------------------------------------------------
# Whole-slide images: one lazy multiscale RGB layer (µm scale) plus the detected tissue as an
# editable Labels layer. Plain TIFFs are not claimed (get_slide_reader returns None) and keep
# opening with napari's own reader.
# ----------------------------------------------------------------------------------------------

def get_slide_reader(path):
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    if str(path).rstrip("/").lower().endswith(".ome.zarr"):
        return read_label_pyramid if _is_label_pyramid(path) else None
    from src_models.slide.reader import is_slide
    return read_slide if is_slide(path) else None


def _is_label_pyramid(path) -> bool:
    try:
        import zarr
        return bool(zarr.open_group(str(path), mode="r").attrs.get("labels"))
    except Exception:
        return False


def read_label_pyramid(path):
    """An OME-Zarr label pyramid (as `napari-dca segment` writes for slides) as a multiscale
    Labels layer with the pyramid's µm scale: it lands on its slide's layer, aligned."""
    import zarr
    path = path[0] if isinstance(path, list) else path
    root = zarr.open_group(str(path), mode="r")
    layers = []
    for name in root.attrs["labels"]:
        group = root["labels"][name]
        meta = group.attrs["multiscales"][0]
        import dask.array as da
        levels = [da.from_zarr(group[d["path"]]) for d in meta["datasets"]]
        scale = meta["datasets"][0]["coordinateTransformations"][0]["scale"]
        layers.append((levels if len(levels) > 1 else levels[0],
                       {"name": f"{Path(path).name} {name}", "multiscale": len(levels) > 1,
                        "scale": tuple(scale), "metadata": {"napari_dca": {"task": name}}},
                       "labels"))
    return layers


def read_slide(path):
    """[(levels, image kwargs, "image"), (tissue mask, labels kwargs, "labels")] for a slide.
    Layers are in µm when the slide says its pixel size (level-0 pixels otherwise), so a result
    computed in level-0 pixels lands aligned with scale = µm/px."""
    from src_models.slide.reader import open_slide
    from src_models.slide.tissue import slide_tissue

    path = path[0] if isinstance(path, list) else path
    slide = open_slide(path)   # stays open: the layer reads its tiles lazily
    name = Path(path).name
    scale = slide.mpp or (1.0, 1.0)
    info = {"path": str(path), "format": slide.format, "mpp": slide.mpp,
            "shape": list(slide.shape), "downsamples": slide.downsamples}
    image = (slide.as_dask(), {"name": name, "multiscale": True, "rgb": True, "scale": scale,
                               "metadata": {"napari_dca_slide": info}}, "image")
    tissue = slide_tissue(slide)
    dy, dx = tissue.downsample
    # mask pixel i covers level-0 pixels [i*d, (i+1)*d): its centre is (d-1)/2 further on
    mask_kwargs = {"name": f"{name} tissue", "scale": (scale[0] * dy, scale[1] * dx),
                   "translate": ((dy - 1) / 2 * scale[0], (dx - 1) / 2 * scale[1]),
                   "opacity": 0.35,
                   "metadata": {"napari_dca_tissue": {"slide": str(path), "method": tissue.method,
                                                      "downsample": [dy, dx]}}}
    return [image, (tissue.mask.astype(np.uint8), mask_kwargs, "labels")]


def write_labels_geojson(path, data, meta):
    """napari writer (File > Save Selected Layers... as .geojson): a Labels layer as QuPath GeoJSON
    in level-0 pixels of its slide (the layer's translate / scale gives its offset)."""
    from src_models.slide.geojson import labels_to_geojson

    labels = data[0] if isinstance(data, (list, tuple)) else data   # multiscale: full resolution
    scale = np.asarray(meta.get("scale", (1.0, 1.0)), float)[-2:]
    translate = np.asarray(meta.get("translate", (0.0, 0.0)), float)[-2:]
    offset = tuple(int(round(t / s)) for t, s in zip(translate, scale))
    task = (meta.get("metadata") or {}).get("napari_dca", {}).get("task") \
        if isinstance((meta.get("metadata") or {}).get("napari_dca"), dict) else None
    class_name = "Gland" if task == "glands" else "Nucleus"
    labels_to_geojson(np.asarray(labels), path, class_name=class_name, offset=offset,
                      image_name=str(meta.get("name", "labels")))
    return [str(path)]
