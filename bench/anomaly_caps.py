"""What the patch bank's cap costs (`train --task anomaly --anomaly-bank-mib CAP`): for each cap, the
wall time and peak memory of the `train` command on ELPV's 1,352 functional training cells, and of
scoring one image, both as the `predict` command on one file (a cold process: loading included) and
in a warm process (the median of single-image calls after the first). Writes
bench/results/anomaly_caps.json.

    python bench/anomaly_caps.py                     # caps 10, 100 and 1000 MiB, seed 0
    python bench/anomaly_caps.py --caps 10 --images 3

Peak memory is the process's maximum resident set (GNU time's %M for the commands, getrusage for
the warm process). The runs share one view store, as a user's runs would: the first cap's run
extracts the patch features, the later ones read them back (their "extract" column says which).
Test-set AUROC is not measured here (at 1,000 MiB scoring the 656 test cells takes most of an
hour on 2 cores): bench/anomaly.py measures it at the default cap.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anomaly import elpv  # noqa: E402
from results import Quiet, read, write  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

WARM = r"""
import json, resource, statistics, sys, time
from pathlib import Path
from transferkit.data.decode import decode
from transferkit.data.listing import from_folder
from transferkit.predict.anomaly_engine import load_detector
run, folder, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
detector = load_detector(run)
load_s = time.perf_counter() - t0
listed = from_folder(folder)
images = decode(listed.subset(list(range(n))), detector.image_size).images
after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for i in range(n):
    t0 = time.perf_counter()
    detector.score(images[i:i + 1])
    times.append(time.perf_counter() - t0)
print(json.dumps({"load_seconds": load_s, "first_seconds": times[0], "median_seconds": statistics.median(times[1:]),
                  "peak_mib_after_load": after_load / 1024,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def timed(command: list[str]) -> tuple[float, float, str]:
    """Wall seconds and peak resident MiB of one command, under GNU time; its stdout."""
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as out:
        proc = subprocess.run(["/usr/bin/time", "-f", "%e %M", "-o", out.name, *command], capture_output=True,
                              text=True)
        if proc.returncode:
            raise SystemExit(f"{' '.join(command)}: {proc.stderr[-2000:]}")
        wall, kib = out.read().split()[-2:]
    return float(wall), float(kib) / 1024, proc.stdout


def one(cap: float, seed: int, cache: Path, work: Path, images: int) -> dict:
    train_dir, test_dir, normal = elpv(work / "data" / "elpv")
    out = work / "runs" / f"caps-{cap:g}-{seed}"
    train_s, train_mib, _ = timed([sys.executable, "-m", "transferkit.cli", "train", str(train_dir), "--out", str(out),
                                   "--overwrite", "--task", "anomaly", "--normal-class", normal, "--seed", str(seed),
                                   "--anomaly-bank-mib", str(cap), "--cache-dir", str(cache), "--quiet"])
    meta = json.loads((out / "model.json").read_text())
    one_file = sorted((test_dir / "defective").iterdir())[0]
    predict_s, predict_mib, _ = timed([sys.executable, "-m", "transferkit.cli", "predict", str(out), str(one_file)])
    _, _, stdout = timed([sys.executable, "-c", WARM, str(out), str(test_dir), str(images)])
    warm = json.loads(stdout.strip().splitlines()[-1])
    a = meta["anomaly"]
    parts = re.search(r"in (\d+) random parts", a.get("coreset", ""))
    row = {"cap_mib": cap, "seed": seed, "coreset_parts": int(parts.group(1)) if parts else 1, "bank_rows": a["bank_rows"], "bank_mib": a["bank_mib"],
           "bank_images": a["bank_images"], "patches": a.get("patches"), "timings": meta["timings"],
           "train_seconds": train_s, "train_peak_mib": round(train_mib), "predict_one_seconds": predict_s,
           "predict_one_peak_mib": round(predict_mib), "warm_first_seconds": round(warm["first_seconds"], 3),
           "warm_median_seconds": round(warm["median_seconds"], 3), "warm_load_seconds": round(warm["load_seconds"], 2),
           "warm_peak_mib": round(warm["peak_mib"]), "warm_peak_mib_after_load": round(warm["peak_mib_after_load"]),
           "warm_images": images}
    print(json.dumps(row), flush=True)
    return row


def tables(rows: list[dict]) -> dict:
    out = [{"cap": r["cap_mib"], "parts": r.get("coreset_parts", 1), "bank": f"{r['bank_rows']:,} ({r['bank_mib']:.0f} MiB)",
            "extract": r["timings"].get("extract_seconds"), "coreset": r["timings"].get("bank_seconds"),
            "threshold": r["timings"].get("threshold_seconds"), "train": r["train_seconds"],
            "train_mib": r["train_peak_mib"], "predict": r["predict_one_seconds"], "predict_mib": r["predict_one_peak_mib"],
            "warm": r["warm_median_seconds"], "warm_mib": r["warm_peak_mib"],
            "quiet": "yes" if r.get("quiet") else "no"}
           for r in sorted(rows, key=lambda r: (r["cap_mib"], r.get("coreset_parts", 1)))]
    columns = [("cap", "cap (MiB)", "{:g}"), ("parts", "coreset parts", None), ("bank", "bank rows (size)", None),
               ("extract", "features (s)", "{:.0f}"), ("coreset", "coreset (s)", "{:.0f}"),
               ("threshold", "held-out scoring (s)", "{:.0f}"), ("train", "`train`, wall (s)", "{:.0f}"),
               ("train_mib", "`train`, peak (MiB)", "{:.0f}"), ("predict", "`predict` one image, wall (s)", "{:.1f}"),
               ("predict_mib", "`predict`, peak (MiB)", "{:.0f}"), ("warm", "one image, warm (s)", "{:.2f}"),
               ("warm_mib", "warm process, peak (MiB)", "{:.0f}"), ("quiet", "quiet machine", None)]
    return {"anomaly_caps": {"columns": [{"key": k, "title": t, **({"format": f} if f else {})} for k, t, f in columns],
                             "rows": out}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caps", nargs="+", type=float, default=[10.0, 100.0, 1000.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=6, help="single-image calls in the warm process")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-anomaly")
    args = parser.parse_args()
    quiet = Quiet()
    try:
        rows = read("anomaly_caps").get("rows", [])
    except (OSError, ValueError):
        rows = []
    with tempfile.TemporaryDirectory() as cache:
        for cap in args.caps:
            mine = Quiet()
            row = one(cap, args.seed, Path(cache), args.work, args.images)
            row.update(mine.measure())  # each row says whether the machine was quiet while it ran
            rows = [r for r in rows if (r["cap_mib"], r["seed"], r.get("coreset_parts", 1)) !=
                    (cap, args.seed, row["coreset_parts"])] + [row]
            write("anomaly_caps", {"rows": rows, "tables": tables(rows)}, quiet=quiet, command=sys.argv)


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"{time.perf_counter() - started:.0f} s", flush=True)
