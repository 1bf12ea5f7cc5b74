"""napari-dca's dock widgets: one per file; each holds GUI state only and calls the engine."""
