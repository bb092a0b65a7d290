"""Which feature layers, which image-score pooling and which bank size for `--task anomaly`: one
pass of the frozen backbone over ELPV's good training cells and its 656 test cells, then every
configuration scored on the same features. Writes bench/results/anomaly_layers.json.

    python bench/anomaly_layers.py                       # ELPV, seed 0, at 224 px
    python bench/anomaly_layers.py --seeds 0 1 2 --configs 2+4 2+3

A configuration is the layers (EfficientNet-Lite0's blocks: 1 = stride 4, 24 channels; 2 = stride 8,
40; 3 = stride 16, 80; 4 = stride 16, 112), each 3x3-averaged and brought to the finest one's grid as
`PatchFeatures` does, the bank (the library's coreset to a cap in MiB, or a random sample of the same
size) and the pooling of patch scores into the image score (the largest; the mean of the top 1 %).
The held-out good cells (val_split 0.2, as `train` does) are left out of the bank, as in a run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anomaly import elpv  # noqa: E402
from results import Quiet, read, write  # noqa: E402

from transferkit.data.decode import decode  # noqa: E402
from transferkit.data.listing import from_folder  # noqa: E402
from transferkit.models.backbones import create_backbone  # noqa: E402
from transferkit.models.fold import fold_batchnorm  # noqa: E402
from transferkit.models.transfer import to_unit  # noqa: E402
from transferkit.openworld.anomaly import (  # noqa: E402
    AGGREGATION,
    GaussianModel,
    bank_rows,
    cap_mib,
    coreset,
    fit_gaussians,
)
from transferkit.predict.anomaly_engine import ranked_auroc  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["blocks.1", "blocks.2", "blocks.3", "blocks.4"]


def extract(model, mean, std, images: np.ndarray, layers: list[str], batch: int = 16) -> dict[str, np.ndarray]:
    """Each layer's 3x3-averaged map of every image, float16, (N, C, H, W)."""
    from timm.models._features_fx import create_feature_extractor

    ex = create_feature_extractor(model, {n: n for n in layers}).eval()
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    out: dict[str, list[np.ndarray]] = {n: [] for n in layers}
    with torch.inference_mode():
        for i in range(0, len(images), batch):
            x = (to_unit(torch.from_numpy(np.ascontiguousarray(images[i:i + batch])).permute(0, 3, 1, 2)) - m) / s
            for n, f in ex(x).items():
                out[n].append(F.avg_pool2d(f.float(), AGGREGATION, 1, AGGREGATION // 2).half().numpy())
    return {n: np.concatenate(v) for n, v in out.items()}


def combine(maps: dict[str, np.ndarray], layers: list[str], index: np.ndarray) -> torch.Tensor:
    """(N, H, W, C) float32 patch features of the images `index`: the layers at the first layer's grid."""
    size = maps[layers[0]].shape[-2:]
    parts = []
    for n in layers:
        t = torch.from_numpy(maps[n][index]).float()
        if t.shape[-2:] != size:
            t = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
        parts.append(t)
    return torch.cat(parts, 1).permute(0, 2, 3, 1).contiguous()


def nearest(q: torch.Tensor, bank: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Each row's distance to its nearest bank row, as `AnomalyModel.patch_scores` computes it."""
    sq = (bank * bank).sum(1)
    out = torch.empty(len(q))
    for i in range(0, len(q), chunk):
        x = q[i:i + chunk]
        out[i:i + chunk] = (torch.addmm(sq, x, bank.T, alpha=-2).min(1).values + (x * x).sum(1)).clamp_min(0).sqrt()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--configs", nargs="+", default=["2+4", "2+3", "3+4", "2+3+4"])
    parser.add_argument("--caps", nargs="+", type=float, default=[8.0])
    parser.add_argument("--random-bank", action="store_true", help="also a random bank of the coreset's size")
    parser.add_argument("--chunks", nargs="+", type=int, default=[],
                        help="also the coreset split into this many parts (coreset's `chunks`), each a bank")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "bench-anomaly")
    args = parser.parse_args()
    quiet = Quiet()
    torch.manual_seed(0)
    train_dir, test_dir, normal = elpv(args.work / "data" / "elpv")
    backbone = create_backbone(image_size=args.image_size)
    size = backbone.preprocess.image_size
    model = fold_batchnorm(backbone.model.eval())
    train = from_folder(train_dir)
    good = train.subset(np.flatnonzero(train.labels == train.classes.index(normal)))
    test = from_folder(test_dir)
    t0 = time.perf_counter()
    good_images = decode(good, size).images
    test_images = decode(test, size).images
    decode_s = time.perf_counter() - t0
    y = (test.labels != test.classes.index(normal)).astype(int)
    used = sorted({f"blocks.{b}" for c in args.configs for b in c.split("+")})
    t0 = time.perf_counter()
    good_maps = extract(model, backbone.preprocess.mean, backbone.preprocess.std, good_images, used)
    test_maps = extract(model, backbone.preprocess.mean, backbone.preprocess.std, test_images, used)
    extract_s = time.perf_counter() - t0
    print(f"decoded {len(good_images)} + {len(test_images)} in {decode_s:.0f}s; features in {extract_s:.0f}s",
          flush=True)
    try:
        rows = read("anomaly_layers").get("rows", [])
    except (OSError, ValueError):
        rows = []
    for seed in args.seeds:
        order = np.random.default_rng(seed).permutation(len(good_images))
        n_hold = round(0.2 * len(good_images))
        bank_index = np.sort(order[n_hold:])
        for config in args.configs:
            layers = [f"blocks.{b}" for b in config.split("+")]
            feats = combine(good_maps, layers, bank_index)
            n, h, w, c = feats.shape
            flat = feats.reshape(-1, c)
            q = combine(test_maps, layers, np.arange(len(test_images))).reshape(-1, c)
            for cap in args.caps:
                rows_n = bank_rows(cap, c)
                banks, chunk_seconds = {}, {}
                t0 = time.perf_counter()
                pool = min(len(flat), 10 * rows_n)
                chosen = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(len(flat), pool, replace=False)))
                candidates = flat[chosen]
                banks["coreset"] = candidates[coreset(candidates, rows_n, seed)] if rows_n < len(flat) else flat
                coreset_s = time.perf_counter() - t0
                chunk_seconds[1] = round(coreset_s, 1)
                for parts in args.chunks:
                    t1 = time.perf_counter()
                    banks[f"coreset-{parts}"] = candidates[coreset(candidates, rows_n, seed, chunks=parts)]
                    chunk_seconds[parts] = round(time.perf_counter() - t1, 1)
                if args.random_bank:
                    pick = np.random.default_rng(seed + 1).choice(len(flat), min(rows_n, len(flat)), replace=False)
                    banks["random"] = flat[torch.from_numpy(pick)]
                t0 = time.perf_counter()  # the Gaussian per cell (--anomaly-method gaussian) on the same features
                mean, precision, channels = fit_gaussians(feats.reshape(n, h * w, c).numpy(), cap_mib("gaussian", None),
                                                          seed, "cpu")
                gauss = GaussianModel(torch.nn.Identity(), mean, precision, channels, size)
                test_feats = q.view(len(test_images), h, w, c).permute(0, 3, 1, 2)
                with torch.inference_mode():
                    g = torch.cat([gauss.patch_scores(test_feats[i:i + 64]).flatten(1)
                                   for i in range(0, len(test_feats), 64)])
                gauss_s = time.perf_counter() - t0
                row = {"seed": seed, "layers": config, "grid": [h, w], "dims": c, "cap_mib": cap_mib("gaussian", None),
                       "bank": "gaussian", "channels": len(channels), "pooling": "max",
                       "auroc": round(float(ranked_auroc(y[None], g.max(1).values.numpy()[None])[0]), 4),
                       "fit_and_score_seconds": round(gauss_s, 1), "image_size": size, "n_test": len(y),
                       "n_bank_images": n}
                print(row, flush=True)
                rows = [r for r in rows if any(r.get(key) != row[key] for key in
                                               ("seed", "layers", "cap_mib", "bank", "pooling", "image_size"))]
                rows.append(row)
                for kind, bank in banks.items():
                    t0 = time.perf_counter()
                    patch = nearest(q, bank).view(len(test_images), -1)
                    score_s = time.perf_counter() - t0
                    k = max(1, round(0.01 * patch.shape[1]))
                    pools = {"max": patch.max(1).values, "top1pct": patch.topk(k, 1).values.mean(1),
                             "mean": patch.mean(1)}
                    for pooling, s in pools.items():
                        row = {"seed": seed, "layers": config, "grid": [h, w], "dims": c, "cap_mib": cap, "bank": kind,
                               "bank_rows": len(bank), "patches": len(flat), "pooling": pooling,
                               "auroc": round(float(ranked_auroc(y[None], s.numpy()[None])[0]), 4),
                               "coreset_seconds": chunk_seconds.get(int(kind.split("-")[1]) if "-" in kind else 1,
                                                                    round(coreset_s, 1)),
                               "score_seconds": round(score_s, 1),
                               "image_size": size, "n_test": len(y), "n_bank_images": n,
                               "extract_seconds_all_layers": round(extract_s, 1)}
                        print(row, flush=True)
                        rows = [r for r in rows if any(r.get(key) != row[key] for key in
                                                       ("seed", "layers", "cap_mib", "bank", "pooling", "image_size"))]
                        rows.append(row)
            save(rows, decode_s, extract_s, quiet)  # after each configuration: an interrupted run keeps its rows
    save(rows, decode_s, extract_s, quiet)


def save(rows: list[dict], decode_s: float, extract_s: float, quiet: Quiet) -> None:
    write("anomaly_layers", {"rows": rows, "decode_seconds": round(decode_s, 1), "extract_seconds": round(extract_s, 1),
                             "tables": tables(rows)}, quiet=quiet, command=sys.argv)


def tables(rows: list[dict]) -> dict:
    """docs/anomaly.md's table: AUROC of each layer choice, bank and pooling (largest patch unless named)."""
    out = []
    for size, layers in sorted({(r["image_size"], r["layers"]) for r in rows}):
        mine = {(r["bank"], r["pooling"]): r for r in rows if (r["image_size"], r["layers"]) == (size, layers)
                and r["seed"] == 0}
        if ("coreset", "max") not in mine:
            continue
        ref = mine[("coreset", "max")]
        out.append({"size": size, "layers": layers, "dims": ref["dims"], "rows": ref["bank_rows"],
                    **{f"{b}_{p}": mine[(b, p)]["auroc"] for b, p in mine},
                    "coreset_s": ref["coreset_seconds"], "score_s": ref["score_seconds"]})
    columns = [("size", "px", None), ("layers", "blocks", None), ("dims", "dims", None),
               ("rows", "bank rows (8 MiB)", None), ("coreset_max", "coreset bank, largest patch", "{:.3f}"),
               ("coreset_top1pct", "coreset, top-1 % mean", "{:.3f}"), ("coreset_mean", "coreset, mean", "{:.3f}"),
               ("random_max", "random bank, largest", "{:.3f}"), ("gaussian_max", "Gaussians, largest", "{:.3f}"),
               ("coreset_s", "coreset (s)", "{:.0f}"), ("score_s", "scoring 656 cells (s)", "{:.0f}")]
    chunks = [{"layers": r["layers"], "cap": r["cap_mib"], "parts": int(r["bank"].split("-")[1]) if "-" in r["bank"] else 1,
               "pool": min(r["patches"], 10 * r["bank_rows"]), "rows": r["bank_rows"], "auroc": r["auroc"],
               "seconds": r["coreset_seconds"]}
              for r in rows if r["pooling"] == "max" and r["bank"].startswith("coreset") and r["seed"] == 0
              and r["image_size"] == 224 and (r["bank"] != "coreset" or any(
                  x["bank"].startswith("coreset-") and x["layers"] == r["layers"] and x["cap_mib"] == r["cap_mib"]
                  for x in rows))]
    chunks.sort(key=lambda r: (r["layers"], r["cap"], r["parts"]))
    chunk_columns = [("layers", "blocks", None), ("cap", "cap (MiB)", "{:g}"), ("parts", "coreset parts", None),
                     ("pool", "pool rows", None), ("rows", "bank rows", None), ("auroc", "AUROC, largest patch", "{:.3f}"),
                     ("seconds", "coreset (s)", "{:.1f}")]
    return {"anomaly_layers": {"columns": [{"key": k, "title": t, **({"format": f} if f else {})}
                                           for k, t, f in columns], "rows": out},
            "anomaly_chunks": {"columns": [{"key": k, "title": t, **({"format": f} if f else {})}
                                           for k, t, f in chunk_columns], "rows": chunks}}


if __name__ == "__main__":
    main()
