"""What a short run pays before and after its work: importing the libraries a training run needs,
in the order it imports them, and the interpreter's exit with and without `gc.freeze()` (what
`transferkit`'s command does on its way out), each in fresh processes, as medians of `--repeats`.

    python bench/startup.py [--repeats 5]

Time it on a quiet machine. Writes bench/results/startup.json (tools/docs_tables.py renders it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import Quiet, write  # noqa: E402

IMPORTS = ("torch", "timm", "sklearn.metrics", "matplotlib.figure", "transferkit.training.recipe")
ALL = ", ".join(IMPORTS)


def child(code: str) -> float:
    """Runs `code` in a fresh interpreter; the seconds from its last printed time to its exit."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return time.time() - float(done.stdout.split()[-1])


def import_seconds(repeats: int) -> dict[str, float]:
    """Each library's own import time, importing them one after another as a run does."""
    code = ("import time, importlib, json; t = {}\n"
            f"for name in {IMPORTS!r}:\n"
            "    s = time.perf_counter(); importlib.import_module(name); t[name] = time.perf_counter() - s\n"
            "print(json.dumps(t))")
    runs = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        runs.append(json.loads(done.stdout))
    return {name: statistics.median(r[name] for r in runs) for name in IMPORTS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    quiet = Quiet()
    imports = import_seconds(args.repeats)
    print("| import (in this order) | seconds |\n|---|---|")
    for name, seconds in imports.items():
        print(f"| {name} | {seconds:.2f} |")
    print(f"| all | {sum(imports.values()):.2f} |")
    plain = statistics.median(child(f"import time, {ALL}; print(time.time())") for _ in range(args.repeats))
    frozen = statistics.median(child(f"import gc, time, {ALL}; print(time.time()); gc.freeze()")
                               for _ in range(args.repeats))
    print(f"\nexit after these imports: {plain:.2f} s; with gc.freeze() first: {frozen:.2f} s "
          f"({plain / frozen:.1f}x less)")
    seconds = {"title": "seconds", "key": "seconds", "format": "{:.2f}", "align": "right"}
    path = write("startup", {
        "repeats": args.repeats,
        "tables": {
            "imports": {"columns": [{"title": "import, in the order a run does", "key": "name", "format": "`{}`"},
                                    seconds],
                        "rows": [*({"name": n, "seconds": t} for n, t in imports.items()),
                                 {"name": "all", "seconds": sum(imports.values())}],
                        "note": f"Fresh processes, median of {args.repeats}."},
            "exit": {"columns": [{"title": "exit after those imports", "key": "name"}, seconds],
                     "rows": [{"name": "Python's default: the last garbage collection walks every object",
                               "seconds": plain},
                              {"name": "`gc.freeze()` first (what the `transferkit` command does)", "seconds": frozen}],
                     "note": f"Fresh processes, median of {args.repeats}."}},
        "figures": {"exit_ratio": {"value": plain / frozen, "format": "{:.1f}x"},
                    "exit_saved": {"value": plain - frozen, "format": "{:.1f} s"}}}, quiet=quiet)
    print(f"wrote {path}")

if __name__ == "__main__":
    main()
