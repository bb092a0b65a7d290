"""The inference path (feature extraction and prediction), one choice at a time: each row adds one
choice to the row above and is timed interleaved with the others in this one process, so the ratios
compare like with like. Also decoding: a thread pool against one thread, and Pillow's JPEG draft
mode on large camera-sized JPEGs. Prints Markdown tables and writes them to
bench/results/inference.json (tools/docs_tables.py renders them).

    python bench/inference.py [--backbone tf_efficientnet_lite0] [--rounds 5]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from transferkit.data.decode import iter_decoded, load_image
from transferkit.models.backbones import create_backbone
from transferkit.models.fold import fold_batchnorm

sys.path.insert(0, str(Path(__file__).resolve().parent))

from results import Quiet, write  # noqa: E402

BATCH = 32


def forward_configs(model: torch.nn.Module, size: int) -> dict:
    """name -> (a function that runs one batch, whether the model must be channels_last); each
    row adds one choice to the row before."""
    x = torch.rand(BATCH, 3, size, size)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    folded = fold_batchnorm(model.to(memory_format=torch.channels_last))  # a channels_last copy

    def run(inp, grad_mode, autocast=False, threads=None, net=model):
        def go():
            if threads:
                torch.set_num_threads(threads)
            with grad_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast):
                net(inp)
            if threads:
                torch.set_num_threads(default_threads)
        return go

    default_threads = torch.get_num_threads()
    configs = {
        "float32, NCHW, autograd on (naive)": (run(x, contextlib.nullcontext), False),
        "+ torch.no_grad": (run(x, torch.no_grad), False),
        "+ torch.inference_mode": (run(x, torch.inference_mode), False),
        "+ channels_last": (run(x_cl, torch.inference_mode), True),
        "+ BatchNorm folded into the convolutions": (run(x_cl, torch.inference_mode, net=folded), True),
    }
    if bf16:
        configs["+ bfloat16 autocast (native on this CPU)"] = (run(x_cl, torch.inference_mode, True, net=folded), True)
        configs["same, BatchNorm not folded"] = (run(x_cl, torch.inference_mode, True), True)
    configs[f"same as the folded rows, 1 thread instead of {default_threads}"] = (
        run(x_cl, torch.inference_mode, bf16, threads=1, net=folded), True)
    return configs


def time_forward(model: torch.nn.Module, size: int, rounds: int) -> list[tuple[str, float]]:
    configs = forward_configs(model, size)
    samples = {name: [] for name in configs}
    for _ in range(rounds):
        for name, (go, channels_last) in configs.items():
            model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            go()  # warm-up for this layout
            start = time.perf_counter()
            go()
            samples[name].append(BATCH / (time.perf_counter() - start))
    return [(name, statistics.median(v)) for name, v in samples.items()]


def time_decode(files: list[str], size: int, workers: int) -> float:
    start = time.perf_counter()
    for _, result in iter_decoded(files, size, workers):
        assert not isinstance(result, str), result
    return len(files) / (time.perf_counter() - start)


def large_jpegs(folder: Path, n: int) -> list[str]:
    """n camera-sized (4032 x 3024) JPEGs made from a real photo (scikit-image's astronaut)."""
    from skimage.data import astronaut

    base = Image.fromarray(astronaut()).resize((4032, 3024), Image.Resampling.BICUBIC)
    paths = []
    for i in range(n):
        path = folder / f"photo{i}.jpg"
        base.rotate(i % 4 * 90, expand=False).save(path, quality=90)
        paths.append(str(path))
    return paths


def time_jpeg(paths: list[str], size: int, draft: bool) -> float:
    start = time.perf_counter()
    for path in paths:
        load_image(path, size, draft=draft)
    return len(paths) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pngs", type=Path, default=Path("data/elpv-split/train"),
                        help="a folder of images for the decoding rows (default: ELPV)")
    args = parser.parse_args()
    quiet = Quiet()
    backbone = create_backbone(args.backbone)
    size = backbone.preprocess.image_size
    model = backbone.model.eval()

    print(f"\nBackbone forward, {args.backbone} at {size} px, batch {BATCH}, median of {args.rounds} "
          f"interleaved rounds, {torch.get_num_threads()} threads by default\n")
    print("| choice | images/s | vs naive |\n|---|---|---|")
    rows = time_forward(model, size, args.rounds)
    for name, speed in rows:
        print(f"| {name} | {speed:.1f} | {speed / rows[0][1]:.2f}x |")

    forward = [{"choice": name, "images_per_s": speed, "ratio": speed / rows[0][1]} for name, speed in rows]
    decoding = []
    print("\n| decoding | images/s | ratio |\n|---|---|---|")
    files = sorted(str(p) for p in args.pngs.rglob("*.png"))[:400]
    if files:
        one, pool = [], []
        for _ in range(3):
            one.append(time_decode(files, size, 1))
            pool.append(time_decode(files, size, 2))
        one, pool = statistics.median(one), statistics.median(pool)
        print(f"| {len(files)} PNGs from {args.pngs}, 1 thread | {one:.0f} | 1x |")
        print(f"| same, pool of 2 threads | {pool:.0f} | {pool / one:.2f}x |")
        decoding += [{"choice": f"{len(files)} PNGs from `{args.pngs}`, 1 thread", "images_per_s": one, "ratio": 1.0},
                     {"choice": "same, pool of 2 threads", "images_per_s": pool, "ratio": pool / one}]
    with tempfile.TemporaryDirectory() as tmp:
        paths = large_jpegs(Path(tmp), 16)
        full, draft = [], []
        for _ in range(3):
            full.append(time_jpeg(paths, size, draft=False))
            draft.append(time_jpeg(paths, size, draft=True))
        full, draft = statistics.median(full), statistics.median(draft)
        print(f"| 4032 x 3024 JPEGs, full decode, 1 thread | {full:.1f} | 1x |")
        print(f"| same, Pillow draft mode (decode at 1/8..1/2 scale) | {draft:.1f} | {draft / full:.2f}x |")
        decoding += [{"choice": "4032 x 3024 JPEGs, full decode, 1 thread", "images_per_s": full, "ratio": 1.0},
                     {"choice": "same, Pillow draft mode (decode at 1/8..1/2 scale)", "images_per_s": draft,
                      "ratio": draft / full}]
    speed = {"title": "images/s", "key": "images_per_s", "format": "{:.1f}", "align": "right"}
    path = write("inference", {
        "settings": {"backbone": args.backbone, "image_size": size, "batch": BATCH, "rounds": args.rounds,
                     "threads": torch.get_num_threads()},
        "tables": {
            "forward": {"columns": [{"title": "choice", "key": "choice"}, speed,
                                    {"title": "vs naive", "key": "ratio", "format": "{:.2f}x", "align": "right"}],
                        "rows": forward,
                        "note": f"{args.backbone} at {size} px, batch {BATCH}, median of {args.rounds} interleaved "
                                f"rounds, {torch.get_num_threads()} threads by default."},
            "decoding": {"columns": [{"title": "decoding", "key": "choice"}, speed,
                                     {"title": "ratio", "key": "ratio", "format": "{:.2f}x", "align": "right"}],
                         "rows": decoding}}}, quiet=quiet)
    print(f"\nwrote {path}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
