"""Mask DINO in single-device PyTorch: backbones, pixel decoder, decoder, losses, post-processing."""
