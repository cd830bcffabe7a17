"""Preemption: a signal asks the run to stop; the ranks agree on a step, save there, and exit.

The protocol, in order:

1. :meth:`PreemptWatch.install` (every worker, main thread) handles SIGTERM, SIGUSR1 and SIGINT.
   The first one only notes the signal and starts a grace timer of ``trainer.preempt_grace_s``.
2. After every step each rank calls :meth:`PreemptWatch.agreed_stop`: one all-reduce (MAX) of a
   one-element flag over the world, so all ranks stop after the same step even when the signal
   reached them at different times (or only one of them).
3. The trainer saves a checkpoint at that step and raises :class:`Preempted`; :meth:`PreemptWatch.hand_on`
   then calls the handler the signal had before (under submitit: its handler requeues the job on
   rank 0 and exits); the entry point exits with ``trainer.preempt_exit_code`` (default 0).

A second signal (at least :data:`REPEAT_WINDOW_S` after the first: a terminal's Ctrl-C reaches
the spawner, which forwards it, and the workers directly), or a grace timer that expires before
the next step boundary, ends the process at once with ``128 + signal number`` and writes no new
checkpoint: ``latest`` keeps naming the last complete one (saves are atomic, see checkpoint.py).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
REPEAT_WINDOW_S = 1.0  # one Ctrl-C delivered twice (directly and forwarded) counts once


class Preempted(Exception):
    """The run stopped on a signal after saving at ``step``; exit with ``exit_code``."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class PreemptWatch:
    """Notes preemption signals in this process; see the module docstring for the protocol."""

    def __init__(self, grace_s: float, rank: int = 0):
        self.grace_s = grace_s
        self.rank = rank
        self.signum: int | None = None  # the first signal, once one arrived
        self.arrived = 0.0  # time.monotonic() of the first signal
        self.timer: threading.Timer | None = None
        self.stopping = False  # the ranks agreed to stop: the save is under way, no grace timer
        self.previous: dict[int, object] = {}

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "none"

    def install(self) -> PreemptWatch:
        if threading.current_thread() is not threading.main_thread():
            log.warning("preemption signals are not handled: the trainer does not run in the main thread")
            return self
        for sig in SIGNALS:
            self.previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        self.cancel_grace()
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self.arrived = signum, now
            print(f"megaring-train: rank {self.rank}: {signal.Signals(signum).name} received: saving a checkpoint "
                  f"at the next step boundary (a second signal, or none within trainer.preempt_grace_s="
                  f"{self.grace_s:g} s, exits without one)", file=sys.stderr, flush=True)
            if self.stopping:
                return
            self.timer = threading.Timer(self.grace_s, self._hard_exit, args=(signum, "no step boundary within "
                                                                              f"{self.grace_s:g} s"))
            self.timer.daemon = True
            self.timer.start()
        elif now - self.arrived >= REPEAT_WINDOW_S:
            self._hard_exit(signum, f"second signal ({signal.Signals(signum).name})")

    def _hard_exit(self, signum: int, why: str) -> None:
        print(f"megaring-train: rank {self.rank}: {why}: exiting without a new checkpoint (the latest complete "
              f"one stays 'latest'), status {128 + signum}", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    def hand_on(self) -> None:
        """After the save: the signal's previous Python handler, if it had one (submitit's requeue on
        its preemption signal, see megaring/configs/hydra/launcher/slurm.yaml). Ctrl-C's KeyboardInterrupt and
        the default actions are not repeated: the run has already stopped as they asked."""
        previous = self.previous.get(self.signum) if self.signum else None
        if callable(previous) and previous is not signal.default_int_handler:
            log.info("%s: handing the signal on to %s", self.signal_name, getattr(previous, "__qualname__", previous))
            previous(self.signum, None)

    def cancel_grace(self) -> None:
        """The boundary is reached: the save may take as long as it takes (collective timeouts bound it)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def agreed_stop(self, device: torch.device) -> int | None:
        """Collective over the world: the signal number on every rank once any rank has received one
        (the largest number when several arrived), else None."""
        flag = torch.tensor([0 if self.signum is None else self.signum], dtype=torch.int32, device=device)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() == 0:
            return None
        self.stopping = True
        self.cancel_grace()
        return int(flag.item())
