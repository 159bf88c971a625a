"""PyTorch side of kernels/mixup.cu."""

KINDS = {}
