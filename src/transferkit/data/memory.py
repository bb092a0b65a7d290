"""Where decoded images and cached arrays live: RAM up to a budget, else a disk-backed memmap."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def memory_budget(gigabytes: float | None = None) -> int:
    """Bytes that decoded images and cached arrays may take in RAM before they spill to disk:
    `gigabytes` when given, else a quarter of the memory available now."""
    if gigabytes:
        return int(gigabytes * 2**30)
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        available = 8 << 30
    return available // 4


def allocate(shape: tuple[int, ...], dtype, in_ram: bool, spill_dir: str | Path | None = None,
             keep: bool = False) -> np.ndarray:
    """A zeroed array in RAM, or a disk-backed memmap in `spill_dir`: deleted with the array, or
    left on disk when `keep`."""
    if in_ram:
        return np.zeros(shape, dtype=dtype)
    spill = Path(spill_dir or tempfile.gettempdir())
    spill.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=spill, suffix=".bin", delete=False)
    shape = tuple(max(d, 1) for d in shape)
    array = np.memmap(handle, dtype=dtype, mode="w+", shape=shape)
    array._transferkit_file = handle  # keeps the file open exactly as long as the array
    if not keep:
        os.unlink(handle.name)  # POSIX: the space is freed when the array goes
    return array

