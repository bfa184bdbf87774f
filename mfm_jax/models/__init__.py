"""Networks (MiT, DAFormer head, ResNet, DeepLab, HRDA, the MFM Rebuilder) and their wrappers."""
