"""Triton kernels, each beside its torch reference, and the models built on them.

Every op dispatches the same way (see `_dispatch`): Triton on CUDA tensors, the torch reference on CPU tensors,
Triton on CPU under ``TRITON_INTERPRET=1``; `backend("torch" | "triton" | "auto")` forces a path.
"""

from ._dispatch import HAS_TRITON, backend, current_backend, use_triton
from .attention_decode import attention_decode, attention_decode_reference
from .attention_prefill import attention_prefill, attention_prefill_reference
from .bias_gelu import bias_gelu, bias_gelu_reference, linear_bias_gelu
from .layernorm import layer_norm, layer_norm_reference
from .linear import linear_t, transposed
from .paged_attention import gather_blocks, paged_attention_decode, paged_attention_decode_reference
from .rmsnorm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from .rotary import rope_tables, rotary, rotary_reference
from .softmax import softmax, softmax_reference
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "HAS_TRITON",
    "add_rms_norm",
    "add_rms_norm_reference",
    "attention_decode",
    "attention_decode_reference",
    "attention_prefill",
    "attention_prefill_reference",
    "backend",
    "bias_gelu",
    "bias_gelu_reference",
    "current_backend",
    "gather_blocks",
    "layer_norm",
    "layer_norm_reference",
    "linear_bias_gelu",
    "linear_t",
    "paged_attention_decode",
    "paged_attention_decode_reference",
    "rms_norm",
    "rms_norm_reference",
    "rope_tables",
    "rotary",
    "rotary_reference",
    "softmax",
    "softmax_reference",
    "swiglu",
    "swiglu_reference",
    "transposed",
    "use_triton",
]
