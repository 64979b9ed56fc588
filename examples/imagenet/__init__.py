"""ImageNet-style classification training with FP32 or INT16 dynamic fixed point (DFP)."""
