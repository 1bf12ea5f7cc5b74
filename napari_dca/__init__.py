"""napari-dca: the napari plugin over the src_models engine."""
__version__ = "0.1.0"
