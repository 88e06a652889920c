"""Layer 1: reading slides lazily (JPEG/PNG, pyramidal TIFF, OpenSlide) and cutting spot patches."""
