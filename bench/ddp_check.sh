#!/usr/bin/env bash
# A short check of the data-parallel path on one device: a torchrun job of one rank (process
# group, DDP; NCCL on CUDA) against the plain process, on scikit-image's LFW crops with random
# weights (no download, no weights package). Prints the job's "Data-parallel:" line and the largest
# weight difference (CPU: 0; CUDA: small, the job's dropout draws differ from CUDA's fused kernel).
#     bash bench/ddp_check.sh cuda        (or cpu)
set -euo pipefail
device=${1:-cuda}
python=${PYTHON:-python}
work=$(mktemp -d)
export PYTHONPATH="$(cd "$(dirname "$0")/.." && pwd)/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 CI=1
"$python" - "$work/lfw" <<'PY'
import sys
from pathlib import Path
import numpy as np
from PIL import Image
from skimage.data import lfw_subset
images = (lfw_subset() * 255).round().astype(np.uint8)
for name, part in (("face", images[:100]), ("background", images[100:])):
    (Path(sys.argv[1]) / name).mkdir(parents=True)
    for i, image in enumerate(part):
        Image.fromarray(image).save(Path(sys.argv[1]) / name / f"{i:03d}.png")
PY
settings=(--weights random --image-size 64 --epochs 2 --fine-tune-epochs 2 --batch-size 16 --cache-dir ""
          --no-flip --rotation 0 --device "$device")
"$python" -m torch.distributed.run --standalone --nproc-per-node 1 -m transferkit train "$work/lfw" \
    --out "$work/job" "${settings[@]}" 2>&1 | grep -E "Data-parallel|Kept epoch|error"
"$python" -m transferkit train "$work/lfw" --out "$work/plain" "${settings[@]}" --quiet
"$python" - "$work" <<'PY'
import json, sys
from safetensors.torch import load_file
job, plain = (load_file(f"{sys.argv[1]}/{name}/model.safetensors") for name in ("job", "plain"))
print("largest weight difference:", max((job[k].float() - plain[k].float()).abs().max().item() for k in job))
print("world_size in model.json:", json.load(open(f"{sys.argv[1]}/job/model.json"))["world_size"])
PY
rm -rf "$work"
