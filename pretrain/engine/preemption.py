"""Stop at a step boundary when the scheduler says time is up.

SLURM warns a job before its time limit with the signal given to
``sbatch --signal`` (USR2 here) and asks it to end with SIGTERM when it is
preempted, requeued or cancelled. Either way the signal lands on every rank
(and their DataLoader workers, which inherit the handler and ignore it) at
slightly different moments, possibly in different steps. The handler only
records the signal; after each optimizer step the ranks agree by an
all-reduce, so they all stop after the same step and write one consistent
checkpoint.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

# Higher wins when ranks saw different signals: a time limit asks for a requeue, SIGTERM does not.
_PRIORITY = {signal.SIGTERM: 1, signal.SIGUSR2: 2}


class StopRequest:
    """Records scheduler signals; ``agreed()`` is the signal all ranks act on, or None."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None

    def install(self) -> "StopRequest":
        """Replace the USR2 and TERM handlers of this process (call before DataLoader workers start)."""
        for sig in _PRIORITY:
            signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, _frame) -> None:
        sig = signal.Signals(signum)
        if self.received is None or _PRIORITY[sig] > _PRIORITY[self.received]:
            self.received = sig

    def agreed(self, device: torch.device) -> signal.Signals | None:
        """The highest-priority signal any rank has received (one small all-reduce when distributed)."""
        local = _PRIORITY[self.received] if self.received is not None else 0
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([local], dtype=torch.int32, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            local = int(flag.item())
        if local == 0:
            return None
        return next(sig for sig, p in _PRIORITY.items() if p == local)
