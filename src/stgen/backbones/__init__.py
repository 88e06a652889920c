"""Layer 7: expression foundation models (the embedded backbone, CellFM and its MindSpore converter, scGPT) and pre-training."""
