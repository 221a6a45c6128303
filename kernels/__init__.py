"""Triton kernels, each beside its torch reference, and the models built on them."""
