"""Process-group set-up for one process, N local processes or SLURM tasks.

DeepSpeed picks its accelerator by itself (CPU when there is no GPU); we pick
gloo on CPU and NCCL on GPU, and fill in the rendezvous for a lone process so
that the same trainer code runs under every launcher.
"""
from __future__ import annotations

import gc
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from pretrain.storage.cache import extension_cache_dir


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_SET_BY_US: set[str] = set()  # environment variables setup_distributed set itself


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed() -> DistInfo:
    """Initialise torch.distributed (through DeepSpeed) from the environment; idempotent."""
    import deepspeed

    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                # DeepSpeed builds a C++ op at start-up: in a build folder of this environment's own, so that
                # another environment's build never evicts it (a set TORCH_EXTENSIONS_DIR is respected)
                "TORCH_EXTENSIONS_DIR": str(extension_cache_dir())}
    if "MASTER_PORT" not in os.environ:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RuntimeError("WORLD_SIZE > 1 but MASTER_PORT is not set: start ranks with `pretrain launch`")
        defaults["MASTER_PORT"] = str(free_port())
    for key, value in defaults.items():
        if key not in os.environ:
            os.environ[key] = value
            _SET_BY_US.add(key)
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def teardown_distributed(barrier: bool = True) -> None:
    """Destroy the process group: without it ranks abort at interpreter exit.

    ``barrier=False`` on an error path: the other ranks may never reach a barrier.
    """
    if dist.is_initialized():
        import deepspeed.comm

        if barrier:
            dist.barrier()
        # DeepSpeed's own teardown also drops its cached world group, so a second
        # run in the same process (tests, notebooks, in-process sweeps) starts clean.
        deepspeed.comm.destroy_process_group()
        # Engines of this run left in reference cycles hold the gloo group: free it here, in this process.
        # Collected later in a forked DataLoader worker of the next run, its destructor joins threads the
        # child does not have: a segfault (seen in tests running several trainers in one process).
        gc.collect()
    # A single-process world's variables were ours: a later run here, or a process started from here
    # (which would inherit a port this one may still hold), picks its own.
    for key in _SET_BY_US:
        os.environ.pop(key, None)
    _SET_BY_US.clear()
