"""Suite-wide test setup: Triton's CPU interpreter when there is no GPU.

Triton fixes interpreted vs compiled for the whole process when it is first
imported, and many test modules import it indirectly (timm, deepspeed,
kernels), so TRITON_INTERPRET=1 has to be set here, before any test module is
collected. It only changes what the "triton" kernel backend can do on CPU:
"auto" never picks triton there, so every other test runs as before.

The repository root is on ``sys.path`` while tests run (``tests`` is a package),
and its ``kernels/`` folder (installed as ``pretrain.kernels``) would shadow
Hugging Face's ``kernels`` package, which transformers imports at start-up when
it is installed (transformers 5.x depends on it). The real one is imported
first, from everywhere but the repository root.
"""

import os
import sys

if "triton" not in sys.modules and os.environ.get("TRITON_INTERPRET") is None:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def _import_hub_kernels_before_the_repository_shadows_it() -> None:
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if "kernels" in sys.modules:
        return
    saved = list(sys.path)
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != root]
    try:
        if importlib.util.find_spec("kernels") is not None:
            import kernels  # noqa: F401  (Hugging Face's, from site-packages)
    finally:
        sys.path[:] = saved


_import_hub_kernels_before_the_repository_shadows_it()
