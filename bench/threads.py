"""CPU threads on a quiet and on a busy machine: the time of one phase-2 training step (the
EfficientNet-Lite0 suffix from block 4 at 14x14, batch 32, Adam), median of 12 steps after 3
warm-up steps, for 2 threads, 1 thread, 2 threads with OMP_WAIT_POLICY=PASSIVE, and transferkit's
default (`set_threads(None)`: the cores free when the phase starts). "Busy": a busy-loop process
started in its own session (so that the scheduler's autogroups give it a full core).

    python bench/threads.py          # run on an otherwise quiet machine
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

CASES = [("2 threads", {"threads": 2}, {}), ("1 thread", {"threads": 1}, {}),
         ("2 threads, OMP_WAIT_POLICY=PASSIVE", {"threads": 2}, {"OMP_WAIT_POLICY": "PASSIVE"}),
         ("default (free cores at phase start)", {"threads": None}, {})]


def worker(threads: int | None) -> None:
    import numpy as np
    import torch

    from transferkit.models.backbones import create_backbone, resolve_fine_tune_at
    from transferkit.models.transfer import TransferModel
    from transferkit.training.cache import SuffixForward, boundary_layer, cut_index, feature_chain
    from transferkit.utils.runtime import set_threads

    used = set_threads(threads)
    backbone = create_backbone()
    model = TransferModel(backbone.model, 2, backbone.preprocess).to(memory_format=torch.channels_last)
    at = resolve_fine_tune_at(backbone.layers, backbone.default_fine_tune_at)
    chain = feature_chain(model.backbone)
    cut = cut_index(chain, boundary_layer(model.backbone, model.layers, at))
    model.unfreeze_from(at)
    model.train()
    forward = SuffixForward(model, chain, cut)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], 1e-4)
    x = torch.randn(32, 80, 14, 14, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 2, (32,), generator=torch.Generator().manual_seed(1))
    times = []
    for step in range(15):
        start = time.perf_counter()
        loss = model.loss(forward(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 3:
            times.append(time.perf_counter() - start)
    print(json.dumps({"ms": 1000 * float(np.median(times)), "threads": used}))


def measure(threads: int | None, env: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(threads)], capture_output=True,
                         text=True, env={**os.environ, **env}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    rows = {}
    for load in ("quiet", "busy"):
        hog = None
        if load == "busy":
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
            time.sleep(1)
        try:
            for name, settings, env in CASES:
                rows[(name, load)] = measure(settings["threads"], env)
        finally:
            if hog:
                hog.kill()
                hog.wait()
    print("| setting | quiet: ms/step (threads) | busy: ms/step (threads) |")
    print("|---|---|---|")
    for name, _, _ in CASES:
        q, b = rows[(name, "quiet")], rows[(name, "busy")]
        print(f"| {name} | {q['ms']:.0f} ({q['threads']}) | {b['ms']:.0f} ({b['threads']}) |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(json.loads(sys.argv[2]))
    else:
        main()
