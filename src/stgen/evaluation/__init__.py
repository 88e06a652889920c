"""Layer 9: metrics (PCC-50/200, MSE, MAE, GSC, SSC, RVD, SSIM), downstream checks and plots."""
