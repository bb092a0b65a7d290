"""The time an interruption costs on ELPV (the fixed 1,968-cell training split, default settings,
2 threads): an uninterrupted run; then runs killed (SIGKILL) at 50 % and at 90 % of its wall time
and continued with --resume. Without --resume the work before the kill is lost and the run starts
again from zero; with it, only the unfinished epoch and the start-up are. Each scenario has its own
fresh view cache, so that a restart from zero really is one. Checks that every resumed run ends
with the uninterrupted run's weights (the SHA-256 in model.json).

    python bench/interrupt.py [--data data/elpv-split]     # quiet machine; about 3.5 x one run
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from prepare_elpv import write  # noqa: E402


def train(data: Path, out: Path, cache: Path, *extra: str, kill_after: float | None = None) -> float:
    """Wall seconds of one `transferkit train` process (killed after `kill_after` seconds if given)."""
    command = [sys.executable, "-m", "transferkit", "train", str(data), "--out", str(out), "--cache-dir",
               str(cache), "--threads", "2", "--quiet", *extra]
    start = time.perf_counter()
    process = subprocess.Popen(command)
    try:
        process.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait()
    else:
        if process.returncode != 0:
            raise SystemExit(f"{' '.join(command)} failed ({process.returncode})")
    return time.perf_counter() - start


def sha(run: Path) -> str:
    return json.loads((run / "model.json").read_text())["model_sha256"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/elpv-split"))
    args = parser.parse_args()
    write(args.data, split=True)
    data, work = args.data / "train", Path(tempfile.mkdtemp(prefix="tk-interrupt-"))
    whole = train(data, work / "whole", work / "cache-whole")
    rows = []
    for share in (0.5, 0.9):
        run, cache = work / f"kill{int(share * 100)}", work / f"cache-{int(share * 100)}"
        before = train(data, run, cache, kill_after=share * whole)
        after = train(data, run, cache, "--resume")
        rows.append((share, before, after, sha(run) == sha(work / "whole")))
    print(f"\nuninterrupted run: {whole:.0f} s\n")
    print("| killed at | ran before the kill | --resume took | total | lost with --resume | lost without "
          "(restart from zero) | same weights as uninterrupted |")
    print("|---|---|---|---|---|---|---|")
    for share, before, after, same in rows:
        print(f"| {share:.0%} | {before:.0f} s | {after:.0f} s | {before + after:.0f} s | "
              f"{before + after - whole:.0f} s | {before:.0f} s | {'yes' if same else 'NO'} |")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
