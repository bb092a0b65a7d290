"""Exact nearest-neighbour search for `--task anomaly`'s patch bank: the torch matrix product it uses
(`BankModel.patch_scores`: one fused addmm, the row minimum) against faiss-cpu's exact
IndexFlatL2, on the shapes an ELPV run has (784 patch features of 152 dimensions per image at 224
px) and banks of the sizes the caps 8, 100 and 1,000 MiB give. Writes bench/results/nn_search.json.

faiss-cpu is not a dependency: run this with a Python that has it, this project's torch and
transferkit (bench/anomalib_compare.py's throwaway venv, with `pip install faiss-cpu`, and this
project's src on the path):

    PYTHONPATH=src /tmp/anomalib-venv/bin/python bench/nn_search.py --threads 2

Exact search costs the same for any values, so the features are seeded random numbers.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import Quiet, write  # noqa: E402

from transferkit.openworld.anomaly import DISTANCE_MIB, BankModel  # noqa: E402

DIMS, CELLS = 152, 784


def torch_search(bank: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The product's search: `BankModel.patch_scores`, in the batches `score_batches` sizes."""
    model = BankModel(torch.nn.Identity(), bank, 224)
    feats = q.view(-1, 28, 28, DIMS).permute(0, 3, 1, 2)
    per = max(1, (DISTANCE_MIB << 20) // (4 * CELLS * model.floats_per_cell()))
    with torch.inference_mode():
        return torch.cat([model.patch_scores(feats[i:i + per]).flatten() for i in range(0, len(feats), per)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--caps", nargs="+", type=float, default=[8, 100, 1000])
    parser.add_argument("--images", type=int, default=4, help="query images (784 patches each)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import faiss

    quiet = Quiet()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((args.images * CELLS, DIMS), dtype=np.float32)
    rows = []
    for cap in args.caps:
        n = int(cap * 2**20) // (4 * DIMS)
        bank = rng.standard_normal((n, DIMS), dtype=np.float32)
        timings = {}
        for name in ("torch", "faiss", "torch", "faiss"):  # alternated, the better of two each
            t0 = time.perf_counter()
            if name == "torch":
                got = torch_search(torch.from_numpy(bank), torch.from_numpy(q)).numpy()
            else:
                index = faiss.IndexFlatL2(DIMS)
                index.add(bank)
                got_f = np.sqrt(np.maximum(index.search(q, 1)[0][:, 0], 0))
            timings[name] = min(timings.get(name, 1e9), time.perf_counter() - t0)
        agree = float(np.abs(got - got_f).max())
        rows.append({"cap_mib": cap, "bank_rows": n, "queries": len(q),
                     "torch_seconds_per_image": round(timings["torch"] / args.images, 3),
                     "faiss_seconds_per_image": round(timings["faiss"] / args.images, 3),
                     "faiss_over_torch": round(timings["faiss"] / timings["torch"], 2), "max_difference": agree})
        print(rows[-1], flush=True)
    columns = [("cap_mib", "cap (MiB)", "{:g}"), ("bank_rows", "bank rows", None),
               ("torch_seconds_per_image", "torch addmm (s per image)", "{:.3f}"),
               ("faiss_seconds_per_image", "faiss IndexFlatL2 (s per image)", "{:.3f}"),
               ("faiss_over_torch", "faiss / torch", "{:.2f}")]
    write("nn_search", {"rows": rows, "faiss": faiss.__version__, "threads": args.threads,
                        "tables": {"nn_search": {"columns": [{"key": k, "title": t, **({"format": f} if f else {})}
                                                             for k, t, f in columns], "rows": rows}}},
          quiet=quiet, command=sys.argv)


if __name__ == "__main__":
    main()
