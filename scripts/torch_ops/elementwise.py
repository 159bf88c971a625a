"""PyTorch side of kernels/elementwise.cu."""

KINDS = {}
