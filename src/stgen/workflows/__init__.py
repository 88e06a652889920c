"""Layer 10: what a user runs: fit, run directories, predict, evaluate, benchmark, ablation, sampler analyses."""
