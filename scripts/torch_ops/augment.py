"""PyTorch side of kernels/augment.cu."""

KINDS = {}
