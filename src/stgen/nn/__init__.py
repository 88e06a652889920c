"""Layer 4: network layers shared by the models (SoftAdaLN, LoRA, DiT blocks, graph attention, embeddings)."""
