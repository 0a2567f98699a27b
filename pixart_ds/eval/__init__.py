"""Image-quality evaluation: FID / KID on Inception-v3 pool features, CLIP score, prompt alignment."""
