"""Fast kernels behind one dispatcher: attention and patch embedding.

    from pretrain import kernels
    out = kernels.attention(q, k, v, key_padding_mask=keep_BN)   # True = keep
    tokens_BND = kernels.patch_embed(x, weight, bias, patch_size=16)
    kernels.configure(attention="flash_attn")                    # process default
    kernels.describe()                                           # what runs, and why not the others

This package imports only torch and, when installed, triton (the "triton"
backend; on CPU it runs only under TRITON_INTERPRET=1 and only when selected
explicitly); optional libraries (flash-attn, xformers) are probed once by their backends.
"""

from pretrain.kernels.dispatch import (
    Backend,
    attention,
    available_backends,
    backend_names,
    configure,
    describe,
    patch_embed,
    register_backend,
    resolve,
)
from pretrain.kernels import triton_backends  # noqa: F401 - registers the "triton" backends

__all__ = [
    "Backend",
    "attention",
    "available_backends",
    "backend_names",
    "configure",
    "describe",
    "patch_embed",
    "register_backend",
    "resolve",
]
