"""Layer 0: helpers every layer may use (atomic writes, hashing, JSON, config-field checks)."""
