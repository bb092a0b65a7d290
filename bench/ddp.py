"""Data-parallel training on ELPV: one process with 2 threads vs 2 ranks (torchrun, gloo) with 1
thread each, on the fixed 1,968 / 656 split. Prints extraction time, epoch times, total time and
test accuracy of both, the measured gloo all-reduce of one step's gradients, and the time the
design predicts for 8 ranks (nodes) from these per-rank figures:

    extraction(N) = extraction_compute(2) x 2 / N + cache_bytes x (N - 1) / N / bandwidth
    epoch(N)      = steps x (step_compute(2) x 2 / N + 2 (N - 1) / N x gradient_bytes / bandwidth
                             + 2 (N - 1) x latency)                        (ring all-reduce)
    total(N)      = serial + extraction(N) + epochs of both phases

where step_compute(2) is a 2-rank step minus its measured all-reduce, and `serial` (start, listing,
decoding, calibration, report: rank 0's, not divided) is the 2-rank total minus its extraction and
epochs. The cache's views are moved once (all-gather); every step moves the trainable part's
gradients (float32).

    python bench/ddp.py [--data data/elpv-split] [--out runs/bench-ddp] [--bandwidth-gbit 10]
                        [--latency-us 50] [any train option as --key value]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from prepare_elpv import write  # noqa: E402
from results import Quiet  # noqa: E402
from results import write as write_results  # noqa: E402

SRC = str(Path(__file__).resolve().parents[1] / "src")


def train(data: Path, out: Path, threads: int, nproc: int, options: list[str]) -> dict:
    """One training run on the command line; its timings, logs and test accuracy."""
    command = [sys.executable, "-m", "transferkit", "train", str(data / "train"), "--out", str(out), "--overwrite",
               "--threads", str(threads), "--cache-dir", "", *(["--nproc", str(nproc)] if nproc > 1 else []), *options]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "CI": "1"}
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if result.returncode:
        sys.exit(result.stderr)
    import transferkit

    meta = json.loads((out / "model.json").read_text())
    lines = (out / "history.csv").read_text().splitlines()
    rows = [dict(zip(lines[0].split(","), line.split(","))) for line in lines[1:]]
    epochs = {p: [float(r["seconds"]) for r in rows if r["phase"] == p] for p in ("1", "2")}
    params = {int(p): int(n.replace(",", "")) for p, n in
              re.findall(r"Phase (\d): .*?, ([\d,]+) trainable parameters", result.stderr)}
    cache_mib = float(re.search(r"Cache: .*?, (\d+) MiB", result.stderr).group(1))
    test = transferkit.load(out).evaluate(data / "test")
    return {"wall": wall, "extract": meta["timings"]["extract_seconds"], "epochs": epochs, "params": params,
            "cache_bytes": cache_mib * 2**20, "test_accuracy": test["accuracy"], "world_size": meta["world_size"],
            "batch_size": meta["config"]["batch_size"], "n": sum(json.loads((out / "metrics.json").read_text())[
                "counts"]["train"].values())}


def allreduce_seconds(nbytes: int, repeats: int = 10) -> float:
    """Median gloo all-reduce of `nbytes` between 2 local ranks (1 thread each)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             __file__, "--allreduce", str(nbytes), str(repeats)], env=env, capture_output=True, text=True)
    if result.returncode:
        sys.exit(result.stderr)
    return float(result.stdout.split()[-1])


def allreduce_rank(nbytes: int, repeats: int) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    tensor = torch.ones(nbytes // 4)
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        started = time.perf_counter()
        dist.all_reduce(tensor)
        times.append(time.perf_counter() - started)
    if dist.get_rank() == 0:
        print(sorted(times[1:])[repeats // 2])
    dist.destroy_process_group()


def main() -> None:
    if sys.argv[1:2] == ["--allreduce"]:
        return allreduce_rank(int(sys.argv[2]), int(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/elpv-split"))
    parser.add_argument("--out", type=Path, default=Path("runs/bench-ddp"))
    parser.add_argument("--bandwidth-gbit", type=float, default=10.0, help="Between nodes, for the 8-rank model.")
    parser.add_argument("--latency-us", type=float, default=50.0, help="Per message, for the 8-rank model.")
    args, options = parser.parse_known_args()
    write(args.data, split=True)
    quiet = Quiet()
    load = os.getloadavg()
    one = train(args.data, args.out / "one", threads=2, nproc=1, options=options)
    two = train(args.data, args.out / "two", threads=1, nproc=2, options=options)
    steps = math.ceil(two["n"] / two["batch_size"])
    gradient = {p: 4 * n for p, n in two["params"].items()}
    measured = {p: allreduce_seconds(b) for p, b in gradient.items()}

    def median(values):
        return sorted(values)[len(values) // 2] if values else 0.0

    print(f"ELPV, {two['n']} training images, {steps} steps of {two['batch_size']} per epoch; load average before: "
          f"{load[0]:.2f}")
    print(f"{'':34}{'1 process x 2 threads':>24}{'2 ranks x 1 thread':>22}")
    for name, key in (("extraction (s)", "extract"), ("total, start to saved run (s)", "wall")):
        print(f"{name:34}{one[key]:>24.1f}{two[key]:>22.1f}")
    for p in ("1", "2"):
        print(f"{'phase ' + p + ' epoch, median (s)':34}{median(one['epochs'][p]):>24.2f}{median(two['epochs'][p]):>22.2f}")
    print(f"{'test accuracy (656 cells)':34}{one['test_accuracy']:>24.4f}{two['test_accuracy']:>22.4f}")

    bandwidth, latency = args.bandwidth_gbit * 1e9 / 8, args.latency_us * 1e-6
    largest = max(gradient, key=gradient.get)
    loopback = gradient[largest] / measured[largest]  # bytes/s: a 2-rank ring all-reduce moves G per rank
    extract_compute = two["extract"] - two["cache_bytes"] / 2 / loopback  # less its all-gather on loopback
    serial = two["wall"] - two["extract"] - sum(sum(v) for v in two["epochs"].values())
    print(f"\nper step, phase 1 / 2: gradients {gradient[1] / 1e3:.1f} kB / {gradient.get(2, 0) / 1e6:.1f} MB; "
          f"gloo all-reduce between 2 local ranks {measured[1] * 1e3:.2f} / {measured.get(2, 0) * 1e3:.1f} ms; "
          f"cache gathered once: {two['cache_bytes'] / 2**20:.0f} MiB; serial part {serial:.1f} s")
    print(f"model for N ranks on nodes like one rank here, {args.bandwidth_gbit:g} Gbit/s, {args.latency_us:g} us:")
    predicted_total = {}
    for n in (1, 2, 8):
        extraction = extract_compute * 2 / n + two["cache_bytes"] * (n - 1) / n / bandwidth
        epochs = 0.0
        for p, times in two["epochs"].items():
            if not times:
                continue
            compute = median(times) / steps - measured[int(p)]
            comm = 2 * (n - 1) / n * gradient[int(p)] / bandwidth + 2 * (n - 1) * latency
            epoch = steps * (compute * 2 / n + comm)
            epochs += epoch * len(times)
            print(f"  N={n}: phase {p} epoch {epoch:.2f} s (compute {steps * compute * 2 / n:.2f}, "
                  f"communication {steps * comm:.2f})")
        predicted_total[n] = serial + extraction + epochs
        print(f"  N={n}: extraction {extraction:.1f} s; total {predicted_total[n]:.0f} s")
    print(f"  predicted speed-up of 8 ranks over 1: {predicted_total[1] / predicted_total[8]:.1f}x "
          f"(the serial {serial:.0f} s is rank 0's alone)")
    rows = [{"way": way, "extract": r["extract"], "epoch1": median(r["epochs"]["1"]), "epoch2": median(r["epochs"]["2"]),
             "epochs": f"{len(r['epochs']['1'])} + {len(r['epochs']['2'])}", "wall": r["wall"],
             "accuracy": 100 * r["test_accuracy"]}
            for way, r in (("1 process x 2 threads", one), ("2 ranks x 1 thread (torchrun, gloo)", two))]
    columns = [("way", "way", None), ("extract", "view extraction (s)", "{:.1f}"),
               ("epoch1", "phase 1 epoch, median (s)", "{:.2f}"), ("epoch2", "phase 2 epoch, median (s)", "{:.2f}"),
               ("epochs", "epochs run", None), ("wall", "start to saved run (s)", "{:.0f}"),
               ("accuracy", "test accuracy, 656 cells (%)", "{:.1f}")]
    model = [{"n": n, "total": predicted_total[n]} for n in (1, 2, 8)]
    write_results("ddp", {"runs": {"one": one, "two": two}, "allreduce_seconds": measured, "serial_seconds": serial,
                          "steps": steps, "bandwidth_gbit": args.bandwidth_gbit, "latency_us": args.latency_us,
                          "tables": {"ddp": {"columns": [{"key": k, "title": t, **({"format": f} if f else {})}
                                                         for k, t, f in columns], "rows": rows},
                                     "ddp_model": {"columns": [{"key": "n", "title": "ranks"},
                                                               {"key": "total", "title": "predicted total (s)",
                                                                "format": "{:.0f}"}], "rows": model}},
                          "figures": {"speedup_2": {"value": one["wall"] / two["wall"], "format": "{:.2f}x"},
                                      "speedup_8_predicted": {"value": predicted_total[1] / predicted_total[8],
                                                              "format": "{:.1f}x"}}},
                  quiet=quiet, command=sys.argv)


if __name__ == "__main__":
    main()
