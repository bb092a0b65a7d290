"""Results files: every figure in docs/ comes from one of these (bench/results/NAME.json).

A bench script calls `write(name, rows, command=...)` at its end; the file records what produced
it (the commit, whether the tree had uncommitted changes, the date, the command), the machine (its
core count) and whether it was quiet while the bench ran (the other processes' CPU use, measured
from /proc/stat over the bench's whole run, against this process's own). `read(name)` gives it back.

    from results import Quiet, write
    quiet = Quiet()            # at the start: the first look at the machine's CPU counters
    ...                        # the measurement
    write("ood", {"rows": rows}, quiet=quiet, command=sys.argv)
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
QUIET_SHARE = 0.10  # the others' CPU use, as a share of the machine's cores, under which a run counts as quiet


def _busy_and_total() -> tuple[float, float]:
    """The machine's busy and total CPU seconds since boot (/proc/stat's first line)."""
    with open("/proc/stat") as fh:
        fields = [float(v) for v in fh.readline().split()[1:]]
    ticks = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)
    return (sum(fields) - idle) / ticks, sum(fields) / ticks


def _own_cpu() -> float:
    """CPU seconds of this process and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


class Quiet:
    """How busy the rest of the machine was from construction to `measure()`: other processes'
    CPU seconds per wall second, as a share of all cores."""

    def __init__(self) -> None:
        self.busy, self.total = _busy_and_total()
        self.own, self.started = _own_cpu(), time.monotonic()

    def measure(self) -> dict:
        busy, total = _busy_and_total()
        others = max(0.0, (busy - self.busy) - (_own_cpu() - self.own))
        share = others / max(total - self.total, 1e-9)
        return {"others_cpu_share": round(share, 3), "quiet": share < QUIET_SHARE,
                "wall_seconds": round(time.monotonic() - self.started, 1)}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def provenance(quiet: Quiet | dict | None = None, command: list[str] | None = None) -> dict:
    """What a results file records about how and where it was made. `quiet` may also be the
    measurement itself (a dict as `Quiet.measure` gives), for a file gathered from several runs."""
    return {
        "commit": _git("rev-parse", "--short", "HEAD") or "unknown",
        "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "command": " ".join(command if command is not None else sys.argv),
        **(quiet if isinstance(quiet, dict) else quiet.measure() if quiet is not None else {"quiet": None}),
    }


def write(name: str, data: dict, quiet: Quiet | dict | None = None, command: list[str] | None = None) -> Path:
    """bench/results/NAME.json: `data` with its provenance; written to a temporary name, then renamed."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"provenance": provenance(quiet, command), **data}, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())
