"""Stop at a step boundary when the scheduler says time is up, or the user presses Ctrl-C.

SLURM warns a job before its time limit with the signal given to
``sbatch --signal`` (USR2 here) and asks it to end with SIGTERM when it is
preempted, requeued or cancelled. Either way the signal lands on every rank
(and their DataLoader workers, which inherit the handler and ignore it) at
slightly different moments, possibly in different steps. The handler only
records the signal; after each optimizer step the ranks agree by an
all-reduce, so they all stop after the same step and write one consistent
checkpoint. ``pretrain train`` does the same on Ctrl-C (SIGINT) and SIGTERM, so
the steps since the last checkpoint are kept; a second Ctrl-C stops at once.
"""
from __future__ import annotations

import signal

import torch
import torch.distributed as dist

# Higher wins when ranks saw different signals: a time limit asks for a requeue, SIGINT and SIGTERM do not.
_PRIORITY = {signal.SIGINT: 1, signal.SIGTERM: 2, signal.SIGUSR2: 3}
SCHEDULER_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
USER_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Records scheduler signals; ``agreed()`` is the signal all ranks act on, or None."""

    def __init__(self) -> None:
        self.received: signal.Signals | None = None

    def install(self, signals: tuple[signal.Signals, ...] = SCHEDULER_SIGNALS) -> "StopRequest":
        """Replace the handlers of ``signals`` in this process (call before DataLoader workers start)."""
        for sig in signals:
            signal.signal(sig, self._record)
        return self

    def _record(self, signum: int, _frame) -> None:
        sig = signal.Signals(signum)
        if sig == signal.SIGINT and self.received == signal.SIGINT:  # Ctrl-C twice: the user will not wait
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
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
