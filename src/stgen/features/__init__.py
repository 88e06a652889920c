"""Layer 3: patch encoders (registry, one module per encoder family), feature extraction and its cache."""
