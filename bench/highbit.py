"""High-bit-depth images (issue 27): ELPV's real 8-bit cells written as 12-bit values in 16-bit PNGs
(v x 16) and as a narrow-band 16-bit signal (30,000 + 4v), trained with `--preset fast` (same seed,
same split: bench/prepare_elpv.py's 1,968/656) and tested on the 656 held-out cells, with the
decoding before this change (a git worktree of the commit before data/window.py) and with this
tree's; plus the time the window adds to decoding. Writes bench/results/highbit.json.

    python bench/highbit.py [--variants 8bit,12bit,narrow] [--decodings new,old] [--base COMMIT]

Each run is `transferkit train DIR --preset fast --cache-dir '' --test-dir TEST` in its own
process with that version's sources first on PYTHONPATH (the view store off: no run reuses
another's features). The converted images are written under data/ (never commit them: ELPV is
CC BY-NC-SA).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from prepare_elpv import write  # noqa: E402
from results import ROOT, Quiet, write as write_results  # noqa: E402

CONVERSIONS = {
    "12bit": lambda a: a.astype(np.uint16) * 16,
    "narrow": lambda a: (30000 + 4 * a.astype(np.int64)).astype(np.uint16),
}


def convert(source: Path, target: Path, variant: str) -> Path:
    """Every PNG below `source` written again below `target` as 16-bit grey PNG (kept if present)."""
    for path in sorted(source.rglob("*.png")):
        out = target / path.relative_to(source)
        if out.exists():
            continue
        out.parent.mkdir(parents=True, exist_ok=True)
        values = np.asarray(Image.open(path).convert("L"))
        Image.fromarray(CONVERSIONS[variant](values)).save(out)
    return target


def base_commit() -> str:
    """The commit before the one that added data/window.py (this tree's parent while uncommitted)."""
    added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "-1", "--",
                            "src/transferkit/data/window.py"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return f"{added}^" if added else "HEAD"


def worktree(commit: str) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="transferkit-old-"))
    subprocess.run(["git", "worktree", "add", "--detach", "-f", str(folder), commit], cwd=ROOT, check=True,
                   capture_output=True)
    return folder


def train(src: Path, data: Path, out: Path, extra: list[str]) -> dict:
    """One run in its own process on the sources in `src`: its test metrics and timings."""
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, "-m", "transferkit.cli", "train", str(data / "train"), "--out", str(out),
               "--preset", "fast", "--cache-dir", "", "--test-dir", str(data / "test"), "--overwrite", *extra]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    test = json.loads((out / "test_metrics.json").read_text())
    meta = json.loads((out / "model.json").read_text())
    window_seconds = re.search(r"Intensity window measured and applied in ([0-9.]+)s", done.stderr)
    return {"test_accuracy": test["accuracy"], "test_accuracy_ci95": test["accuracy_ci95"],
            "test_balanced_accuracy": test["balanced_accuracy"], "test_roc_auc": test["roc_auc"],
            "test_n": test["n"], "skipped": len(test.get("skipped", [])),
            "intensity_window": meta["preprocess"].get("intensity_window"),
            "window_seconds": float(window_seconds.group(1)) if window_seconds else None,
            "training_seconds": meta["training_seconds"], "wall_seconds": round(seconds, 1)}


def decode_seconds(folders: dict[str, Path], repeats: int = 3) -> dict:
    """This tree's decoding of each training folder at 224 px (median of `repeats`): 8-bit as it
    is; 16-bit with the window (decode, measure, decode the waiting images again)."""
    from transferkit.data.decode import decode, fill, settle
    from transferkit.data.listing import load_labelled
    from transferkit.data.window import Rules

    timings = {}
    for name, folder in folders.items():
        listing = load_labelled(folder / "train")
        runs = []
        for _ in range(repeats):
            started = time.perf_counter()
            data = decode(listing, 224, defer=True)
            decoded = time.perf_counter()
            rules, _ = settle(data, np.arange(len(data)), Rules(), 0.5, 99.5)
            fill(data, rules, 224)
            runs.append((decoded - started, time.perf_counter() - decoded))
        timings[name] = {"images": len(listing), "decode_seconds": round(statistics.median(r[0] for r in runs), 2),
                         "window_seconds": round(statistics.median(r[1] for r in runs), 2)}
    return timings


def readers(repeats: int = 7) -> list[dict]:
    """Pillow against tifffile on the TIFF kinds a scientific camera writes (a real 1,024 px
    micrograph, scikit-image's cell, as 12-bit values): median seconds to a numpy array, and
    whether the numbers come out right."""
    import tifffile
    from skimage import data

    cell = np.asarray(Image.fromarray(data.cell()).resize((1024, 1024))).astype(np.uint16) * 16
    cases = {"16-bit grey": cell, "16-bit RGB": np.dstack([cell, cell[::-1], cell[:, ::-1]]),
             "32-bit float grey": cell.astype(np.float32) / 4095, "64-bit float grey": cell / 4095.0,
             "2-channel 16-bit": np.dstack([cell, cell[::-1]]), "16-bit grey, 3 pages": np.stack([cell] * 3)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, truth in cases.items():
            path = Path(tmp) / "x.tif"
            tifffile.imwrite(path, truth, photometric="rgb" if truth.ndim == 3 and truth.shape[-1] == 3 else "minisblack",
                             planarconfig="contig" if truth.ndim == 3 and truth.shape[-1] in (2, 3) else None)
            first = truth[0] if name.endswith("pages") else truth

            def pillow():
                with Image.open(path) as image:
                    return np.asarray(image)

            def tiff():
                with tifffile.TiffFile(path) as t:
                    return t.pages[0].asarray()

            for reader, read in (("Pillow", pillow), ("tifffile", tiff)):
                try:
                    got = read()
                except Exception as exc:  # noqa: BLE001 - a reader that refuses is a result
                    rows.append({"tiff": name, "reader": reader, "result": f"refused ({type(exc).__name__})"})
                    continue
                times = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    read()
                    times.append(time.perf_counter() - started)
                right = got.shape == first.shape and np.array_equal(got.astype(np.float64), first.astype(np.float64))
                rows.append({"tiff": name, "reader": reader, "seconds": round(statistics.median(times), 4),
                             "result": "exact" if right else f"wrong (dtype {got.dtype}, max {got.max()} vs "
                                                             f"{first.max():g})"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("data/elpv-split"))
    parser.add_argument("--converted", type=Path, default=Path("data/elpv-highbit"))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-highbit"))
    parser.add_argument("--variants", default="12bit,narrow,8bit")
    parser.add_argument("--decodings", default="new,old")
    parser.add_argument("--base", default=None, help="the commit whose decoding is 'old' (default: before window.py)")
    parser.add_argument("--with-8bit-old", action="store_true",
                        help="also train 8-bit with the old decoding (it decodes bit for bit as the new one: "
                             "tests/test_highbit.py; so by default its new run stands for both)")
    parser.add_argument("--repeats", type=int, default=3, help="decoding timings: the median of this many")
    parser.add_argument("--decoding-only", action="store_true",
                        help="only the decoding timings of the converted sets (bench/results/highbit_decoding.json)")
    parser.add_argument("--readers-only", action="store_true",
                        help="only Pillow against tifffile on 16-bit TIFF (bench/results/highbit_readers.json)")
    args, extra = parser.parse_known_args()
    quiet = Quiet()
    if args.decoding_only:  # the time the window adds to decoding, alone
        folders = {"8bit": args.data, **{v: args.converted / v for v in CONVERSIONS}}
        timings = decode_seconds(folders, args.repeats)
        print(json.dumps(timings, indent=2))
        print(f"wrote {write_results('highbit_decoding', {'decoding_224px': timings}, quiet=quiet, command=sys.argv)}")
        return
    if args.readers_only:
        rows = readers()
        for row in rows:
            print(json.dumps(row))
        print(f"wrote {write_results('highbit_readers', {'rows': rows}, quiet=quiet, command=sys.argv)}")
        return
    if not (args.data / "train").is_dir():
        write(args.data, split=True)
    folders = {"8bit": args.data}
    for variant in CONVERSIONS:
        folders[variant] = convert(args.data, args.converted / variant, variant)
    base = args.base or base_commit()
    old_tree = worktree(base) if "old" in args.decodings.split(",") else None
    sources = {"new": ROOT / "src", "old": None if old_tree is None else old_tree / "src"}
    rows, timings = [], None
    head = {"base_commit": subprocess.run(["git", "rev-parse", "--short", base], cwd=ROOT, capture_output=True,
                                          text=True).stdout.strip(),
            "preset": "fast", "split": "ELPV 1,968 train / 656 test, seed 0 (bench/prepare_elpv.py)",
            "extra_options": extra}

    def save(complete: bool) -> Path:  # after every run: a long bench on a shared machine keeps what it measured
        return write_results("highbit", {**head, "complete": complete, "runs": rows, "decoding_224px": timings},
                             quiet=quiet, command=sys.argv)

    try:
        timings = decode_seconds({k: v for k, v in folders.items() if k in args.variants.split(",")}, args.repeats)
        print(json.dumps(timings, indent=2), flush=True)
        for decoding in args.decodings.split(","):  # this tree's runs first, then the old decoding's
            for variant in args.variants.split(","):
                if variant == "8bit" and decoding == "old" and not args.with_8bit_old:
                    continue
                out = args.work / f"{variant}-{decoding}"
                result = train(sources[decoding], folders[variant], out, extra)
                rows.append({"variant": variant, "decoding": decoding, **result})
                print(json.dumps(rows[-1]), flush=True)
                save(False)
    finally:
        if old_tree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(old_tree)], cwd=ROOT, capture_output=True)
    print(f"wrote {save(True)}")


if __name__ == "__main__":
    main()
