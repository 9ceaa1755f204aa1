"""Fast kernels behind one dispatcher: attention and patch embedding.

    import kernels
    out = kernels.attention(q, k, v, key_padding_mask=keep_BN)   # True = keep
    tokens_BND = kernels.patch_embed(x, weight, bias, patch_size=16)
    kernels.configure(attention="flash_attn")                    # process default
    kernels.describe()                                           # what runs, and why not the others

This package imports only torch (and, later, triton); optional libraries
(flash-attn, xformers) are imported lazily by their backends.
"""

from kernels.dispatch import (
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
