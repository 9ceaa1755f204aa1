"""What a run reports: TensorBoard scalars and images, a console progress bar, throughput and MFU."""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense bf16/fp16 tensor-core peak FLOP/s by device name fragment (datasheet numbers, no sparsity).
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A6000": 155e12,
    "V100": 125e12,
    "4090": 165e12,
    "3090": 71e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's peak FLOP/s, or None off-GPU or for an unknown GPU (then MFU is not logged)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, flops in PEAK_FLOPS.items():
        if fragment in name:
            return flops
    return None


def memory_stats(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        return {
            "memory/allocated_gb": torch.cuda.memory_allocated(device) / 2**30,
            "memory/max_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
        }
    # ru_maxrss is in KiB on Linux
    return {"memory/host_max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


class StepTimer:
    """Accumulates data-wait and compute time between two reports."""

    def __init__(self) -> None:
        self.data = 0.0
        self.compute = 0.0
        self.steps = 0
        self.samples = 0
        self.started = time.perf_counter()

    def reset(self) -> None:
        self.__init__()

    def rates(self, tokens_per_sample: int, world_size: int) -> dict[str, float]:
        wall = max(time.perf_counter() - self.started, 1e-9)
        steps = max(self.steps, 1)
        samples = self.samples * world_size
        return {
            "perf/samples_per_s": samples / wall,
            "perf/tokens_per_s": samples * tokens_per_sample / wall,
            "perf/step_time_s": wall / steps,
            "perf/data_wait_s": self.data / steps,
            "perf/compute_s": self.compute / steps,
        }


class Monitor:
    """Rank 0 writes; other ranks hold a silent monitor so call sites stay unconditional."""

    def __init__(self, log_dir: Path, enabled: bool, total_steps: int, start_step: int, progress: bool) -> None:
        self.enabled = enabled
        self.writer = None
        self.bar = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        # On resume, drop events logged after the checkpoint by the interrupted run.
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step or None)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0 if sys.stderr.isatty() else 15.0,
            )

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def images(self, step: int, images: dict[str, torch.Tensor]) -> None:
        if self.writer is None:
            return
        for tag, img_CHW in images.items():
            self.writer.add_image(tag, img_CHW.float().clamp(0, 1).cpu(), step)

    def advance(self, n: int, postfix: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def rewind(self, step: int) -> None:
        """The run went back to ``step`` (a rollback): the bar shows it."""
        if self.bar is not None:
            self.bar.n = step
            self.bar.refresh()

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
