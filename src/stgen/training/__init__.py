"""Layer 6: the Lightning trainer factory, checkpoints and resuming, best-weights bookkeeping, resumable randomness, crops."""
