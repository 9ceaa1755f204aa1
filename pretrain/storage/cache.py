"""Where medpretrain keeps what it can rebuild: feature caches, compiled extensions."""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path


def cache_root() -> Path:
    """``$MEDPRETRAIN_CACHE``, else ``$XDG_CACHE_HOME/medpretrain``, else ``~/.cache/medpretrain``."""
    root = os.environ.get("MEDPRETRAIN_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "medpretrain")
    return Path(root).expanduser()


def extension_cache_dir() -> Path:
    """A build folder for torch C++ extensions (DeepSpeed's CPU shared-memory op) of this environment alone.

    torch's default, ``~/.cache/torch_extensions/py311_cu130``, is shared by every environment with the same
    Python and CUDA: two environments with other torch or DeepSpeed versions rebuild the extension (~40 s)
    each time the other has run. Keyed by the interpreter's prefix and both versions, each keeps its own build.
    """
    import deepspeed
    import torch

    tag = f"{sys.prefix}\0{torch.__version__}\0{deepspeed.__version__}"
    return cache_root() / "torch_extensions" / hashlib.sha256(tag.encode()).hexdigest()[:16]
