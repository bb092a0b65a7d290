"""The process a run lives in: its device, its seeds, its CPU threads, and its signals (Ctrl-C and
SIGTERM end the current step and leave the run resumable)."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from .errors import ConfigError


def resolve_device(device: str) -> torch.device:
    """The torch device for a `device` setting; an error naming what is available otherwise."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.partition(":")[2] or 0)
        if index >= count:
            have = ", ".join(["cpu"] + [f"cuda:{i}" for i in range(count)])
            raise ConfigError(f"device {device!r} is not available on this machine (available: {have})")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' is not available on this machine (available: cpu)")
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cpu_times() -> tuple[float, float, float] | None:
    """Idle and total CPU seconds of the whole machine (/proc/stat) and this process's CPU seconds."""
    try:
        with open("/proc/stat") as fh:
            values = [float(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)
    own = os.times()
    return idle / tick, sum(values) / tick, own.user + own.system


_last_sample = _cpu_times()  # free_cores measures from here (import time) on, then from its last call


def free_cores(sample: float = 0.25, recent: float = 10.0) -> int:
    """Cores not used by other processes now: the machine's busy CPU time less this process's own,
    since the last measurement (or the import of this module) if that was at most `recent` seconds
    ago, else over a fresh `sample` seconds; at least `sample` seconds either way (this process
    waits for the rest). All usable cores where that cannot be measured."""
    global _last_sample
    cores = usable_cores()
    machine = os.cpu_count() or cores
    now, since = _cpu_times(), _last_sample
    if now is None:
        return cores
    elapsed = (now[1] - since[1]) / machine if since else 0.0  # wall seconds, as the machine counts them
    if since is None or elapsed > recent:  # too long ago to tell what is free now
        since, elapsed = now, 0.0
    if elapsed < sample:
        time.sleep(sample - elapsed)
        now = _cpu_times()
    _last_sample = now
    total = now[1] - since[1]
    others = (total - (now[0] - since[0]) - (now[2] - since[2])) / total if total > 0 else 0.0
    return max(1, min(cores, round((1 - others) * machine)))


def set_threads(threads: int | None) -> int:
    """CPU threads for torch: as asked, else the cores that are free now. On a machine where
    another process holds a core, OpenMP's spin-waiting makes two threads many times slower than
    one (measured in docs/benchmarks.md), so the default counts free cores before each phase.
    Under torchrun each of the machine's ranks takes its share of the cores (the others are busy by
    design, so free cores would undercount)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    n = threads or (free_cores() if local == 1 else max(1, usable_cores() // local))
    torch.set_num_threads(n)
    return n


@contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM set `stop` (the work ends at its next step and
    raises Interrupted) and restore the previous handlers, so a second signal acts at once. Only in
    the main thread, where Python delivers signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals = [signal.SIGINT, signal.SIGTERM]
    previous = {s: signal.getsignal(s) for s in signals}

    def handler(signum, _frame):
        stop.signum = signum
        stop.set()
        for s, h in previous.items():
            signal.signal(s, h)

    for s in signals:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
