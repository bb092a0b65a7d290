"""Plain loop vs cached pipeline on ELPV (the fixed 1,968/656 split), identical settings, one
invocation on one machine; each pipeline runs in a fresh child process so that its peak RSS is its
own. Prints a Markdown table.

    python bench/speed.py [--epochs 10 --fine-tune-epochs 8 --views 2] [--sizes 500,1000,1968] [--no-main]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from prepare_elpv import write  # noqa: E402

from transferkit.cfg.settings import default_of


def subset(train_dir: Path, n: int, out: Path) -> Path:
    """A stratified subset of n training images, as symlinked class folders."""
    files = sorted(train_dir.glob("*/*.png"))
    if n > len(files):
        raise SystemExit(f"--sizes: {n} is more than the {len(files)} training images")
    labels = np.array([f.parent.name for f in files])
    rng = np.random.default_rng(0)
    keep = []
    for name in np.unique(labels):
        index = np.flatnonzero(labels == name)
        keep += list(rng.choice(index, round(n * len(index) / len(files)), replace=False))
    for i in keep:
        (out / files[i].parent.name).mkdir(parents=True, exist_ok=True)
        (out / files[i].parent.name / files[i].name).symlink_to(files[i].resolve())
    return out


def job(args: tuple) -> dict:
    data, test, out, settings = args
    import torch

    import transferkit
    from transferkit.models.backbones import create_backbone

    start = time.perf_counter()
    clf = transferkit.train(data, out, **settings)
    total = time.perf_counter() - start
    timings = clf.meta["timings"]
    accuracy = clf.evaluate(test)["accuracy"] if test else None
    backbone = create_backbone(settings.get("backbone", "tf_efficientnet_lite0")).model.eval()
    x = torch.randint(0, 255, (32, 3, 224, 224), dtype=torch.uint8).float().contiguous(memory_format=torch.channels_last)
    backbone = backbone.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        backbone(x)
        t = time.perf_counter()
        backbone(x)
        backbone(x)
        forward = 64 / (time.perf_counter() - t)
    return {"total": total, "extract": timings.get("extract_seconds", 0.0),
            "phase1": timings.get("phase1_seconds", 0.0), "phase2": timings.get("phase2_seconds", 0.0),
            "forward_images_per_s": forward, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "test_accuracy": accuracy}


def run(pool_args: tuple) -> dict:
    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(job, (pool_args,))


def main_table(rows: dict, views: int) -> None:
    print("| pipeline | extraction s | phase 1 s | phase 2 s | total s | speed-up | backbone fwd img/s "
          "| (extraction + phase 1) / floor | peak RSS MiB | test accuracy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = rows["plain loop (--no-cache)"]["total"]
    for name, r in rows.items():
        floor = (views + 1) * 1574 / r["forward_images_per_s"]  # each view computed once
        print(f"| {name} | {r['extract']:.0f} | {r['phase1']:.0f} | {r['phase2']:.0f} | {r['total']:.0f} | "
              f"{base / r['total']:.1f}x | {r['forward_images_per_s']:.0f} | "
              f"{(r['extract'] + r['phase1']) / floor:.2f} | {r['peak_rss_mib']:.0f} | "
              f"{r['test_accuracy'] * 100:.1f} % |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/elpv-split"))
    parser.add_argument("--epochs", type=int, default=default_of("epochs"))
    parser.add_argument("--fine-tune-epochs", type=int, default=default_of("fine_tune_epochs"))
    parser.add_argument("--views", type=int, default=default_of("views"))
    parser.add_argument("--fine-tune-at", default=None, help="default: the backbone's")
    parser.add_argument("--sizes", default="500,1000,1968", help="training-set sizes for the scaling rows ('' = skip)")
    parser.add_argument("--no-main", action="store_true", help="only the scaling rows")
    args = parser.parse_args()
    write(args.data, split=True)
    work = Path(tempfile.mkdtemp(prefix="tk-speed-"))
    common = {"epochs": args.epochs, "fine_tune_epochs": args.fine_tune_epochs, "views": args.views,
              "fine_tune_at": args.fine_tune_at, "seed": 42}
    cache_dir = str(work / "views")
    train, test = args.data / "train", args.data / "test"
    rows = {} if args.no_main else {
        "plain loop (--no-cache)": run((train, test, work / "plain", {**common, "cache": False})),
        "cached, first run": run((train, test, work / "cached", {**common, "cache_dir": cache_dir})),
        "cached, rerun with lr 5e-4": run((train, test, work / "rerun", {**common, "cache_dir": cache_dir, "lr": 5e-4})),
    }
    print(f"\nELPV train 1,968 (1,574 + 394 validation) / test 656; epochs {args.epochs} + "
          f"{args.fine_tune_epochs}; fine_tune_at {args.fine_tune_at or 'default'}; K = {args.views} "
          f"augmented views; {mp.cpu_count()} CPU cores\n")
    if rows:
        main_table(rows, args.views)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if sizes:
        print("\n| training images | plain s/image | cached s/image | speed-up |")
        print("|---|---|---|---|")
        for n in sizes:
            data = subset(train, n, work / f"subset-{n}")
            plain = run((data, None, work / f"p{n}", {**common, "cache": False}))
            cached = run((data, None, work / f"c{n}", {**common, "cache_dir": str(work / f"v{n}")}))
            print(f"| {n} | {plain['total'] / n:.3f} | {cached['total'] / n:.3f} | "
                  f"{plain['total'] / cached['total']:.1f}x |", flush=True)
    if rows:
        Path("runs").mkdir(exist_ok=True)
        Path("runs/speed.json").write_text(json.dumps(rows, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
