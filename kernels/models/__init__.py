"""Inference models built on our kernels."""
