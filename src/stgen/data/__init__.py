"""Layer 2: reading sections (Her2ST, HEST-1k, Space Ranger, .h5ad) into AnnData, targets, the HMHVG panel, tissue and virtual spots."""
