"""TRIPLEX (Chung et al., CVPR 2024): target, neighbourhood and global views with cross-attention fusion."""
