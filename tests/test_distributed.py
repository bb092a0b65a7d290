"""Data-parallel training on torchrun (issue 12), on CPU with gloo: two ranks train the one
process's weights and write nothing but through rank 0; two "nodes" on loopback give the same; a
rank killed mid-extraction ends the job at once with one line; resume needs the same world size.
The fast tests check the pieces: shards, the per-rank loss weights, the global dropout mask, the
failure report."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import free_port, lfw_arrays, write_folders

from transferkit.training.distributed import Batch, Context, ShardDropout, describe_failure
from transferkit.utils.errors import ConfigError

TESTS = Path(__file__).resolve().parent
SRC = str(TESTS.parent / "src")
# Augmentation off: one clean view per image, so that both runs train on the same numbers.
SETTINGS = ["--image-size", "32", "--epochs", "2", "--fine-tune-epochs", "2", "--batch-size", "8",
            "--threads", "1", "--cache-dir", "", "--no-flip", "--rotation", "0"]


def environment(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": SRC, "CI": "1", "HF_HUB_OFFLINE": "1", **extra}


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def run(command: list[str], timeout: float = 120, **env) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=environment(**env), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def assert_same_training(out: Path, reference: Path) -> None:
    """The same weights within float tolerance, the same epochs and validation answers."""
    a, b = weights(out), weights(reference)
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) < 1e-4
    rows = [line.split(",") for line in (out / "history.csv").read_text().splitlines()]
    reference_rows = [line.split(",") for line in (reference / "history.csv").read_text().splitlines()]
    assert len(rows) == len(reference_rows)
    for row, ref in zip(rows[1:], reference_rows[1:]):
        assert row[:3] == ref[:3]  # epoch, phase, lr
        assert np.allclose([float(v) for v in row[3:7]], [float(v) for v in ref[3:7]], rtol=1e-5, atol=1e-6)
    meta, reference_meta = (json.loads((d / "model.json").read_text()) for d in (out, reference))
    assert meta["best_epoch"] == reference_meta["best_epoch"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    images, _ = lfw_arrays()
    return write_folders(tmp_path_factory.mktemp("ddp") / "data",
                         {"face": list(images[:30]), "background": list(images[100:130])})


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "run"
    run([sys.executable, "-m", "transferkit", "train", str(data), "--out", str(out), *SETTINGS])
    return out


@pytest.mark.slow
def test_two_ranks_train_the_one_process_weights_and_only_rank_0_writes(data, one_process, tmp_path):
    out, audit, scratch = tmp_path / "run", tmp_path / "audit", tmp_path / "tmp"
    audit.mkdir()
    scratch.mkdir()
    run(torchrun("--standalone", "--nproc-per-node", "2", str(TESTS / "rank_audit.py"), "train", str(data),
                 "--out", str(out), *SETTINGS), AUDIT_DIR=str(audit), TMPDIR=str(scratch))
    assert_same_training(out, one_process)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in one_process.iterdir())
    meta, reference = (json.loads((d / "model.json").read_text()) for d in (out, one_process))
    assert meta.keys() == reference.keys() and (meta["world_size"], reference["world_size"]) == (2, 1)
    assert meta["status"] == "complete"
    by_rank = [set((audit / f"rank-{r}.txt").read_text().split()) for r in (0, 1)]
    assert any(p.startswith(str(out)) for p in by_rank[0])  # the audit sees rank 0's writes
    # rank 1 wrote in its private scratch folder (its spills and its shard's views), removed at its
    # exit, and nowhere else but libraries' passing temporary files (and torch's compile cache folder)
    assert any("transferkit-rank1-" in p for p in by_rank[1])
    assert not list(scratch.glob("transferkit-rank*"))
    assert [p for p in by_rank[1] if p != "/dev/null" and not (Path(p).is_relative_to(scratch) and (
        not Path(p).exists() or Path(p).name.startswith("torchinductor_")))] == []


@pytest.mark.slow
def test_two_nodes_on_loopback_give_the_one_process_result(data, one_process, tmp_path):
    out, port = tmp_path / "run", free_port()
    nodes = [subprocess.Popen(torchrun("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                                       "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                                       "--rdzv-id", "two-nodes", "-m", "transferkit", "train", str(data),
                                       "--out", str(out), *SETTINGS),
                              env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    logs = [node.communicate(timeout=180)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], logs
    assert_same_training(out, one_process)
    assert json.loads((out / "model.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_multilabel_data_trains_the_same_weights_on_two_ranks(tmp_path):
    from conftest import composite_set

    labels = composite_set(tmp_path / "data", 0, 4)
    one, two = tmp_path / "one", tmp_path / "two"
    settings = [*SETTINGS, "--class-weight", "balanced"]  # a pos_weight per class
    run([sys.executable, "-m", "transferkit", "train", str(labels), "--out", str(one), *settings])
    run([sys.executable, "-m", "transferkit", "train", str(labels), "--out", str(two), "--nproc", "2", *settings])
    assert_same_training(two, one)
    assert json.loads((two / "model.json").read_text())["task"] == "multilabel"


def children(pid: int) -> list[int]:
    return [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]


def rank_of(pid: int) -> int | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next((int(e[5:]) for e in env if e.startswith(b"RANK=")), None)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the ranks' processes in /proc")
def test_a_rank_killed_mid_extraction_ends_the_job_with_one_line_and_resumes_with_the_same_world_size(data, tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "transferkit", "train", str(data), "--out", str(out), "--nproc", "2",
               "--image-size", "80", "--views", "3", "--epochs", "1", "--fine-tune-epochs", "1", "--batch-size", "8",
               "--threads", "1", "--cache-dir", ""]
    job = subprocess.Popen(command, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    for line in job.stderr:
        if line.startswith("Cache:"):  # rank 0 starts extracting; rank 1 is extracting its shard
            break
    ranks = {rank_of(pid): pid for pid in children(job.pid)}
    os.kill(ranks[1], signal.SIGKILL)
    killed = time.monotonic()
    rest = job.stderr.read()
    assert job.wait(60) == 2
    assert time.monotonic() - killed < 30
    errors = [line for line in rest.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert errors == [f"error: rank 1 (pid {ranks[1]}) was killed by SIGKILL (by a user, or by the kernel when "
                      f"memory ran out); the job stopped; {out} is resumable: the same command with --resume"], rest
    alone = subprocess.run([*command[:command.index("--nproc")], *command[command.index("--nproc") + 2:], "--resume"],
                           env=environment(), capture_output=True, text=True, timeout=120)
    assert alone.returncode == 2
    assert alone.stderr.strip().splitlines() == [f"error: {out} was trained by 2 process(es), not 1; resume it with the "
                                                 "same world size (the order and the batches depend on it)"]
    run([*command, "--resume"])
    assert json.loads((out / "model.json").read_text())["status"] == "complete"


# -- the pieces ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, world", [(10, 2), (7, 3), (2, 4), (0, 2)])
def test_shards_are_contiguous_and_cover_every_item_once(n, world):
    parts = [Context(rank=r, world_size=world).shard(n) for r in range(world)]
    assert [i for part in parts for i in range(n)[part]] == list(range(n))
    assert max(len(range(n)[p]) for p in parts) - min(len(range(n)[p]) for p in parts) <= 1


@pytest.mark.parametrize("size", [8, 5, 1])
def test_the_ranks_weighted_losses_average_to_the_whole_batch_loss(size):
    rng = np.random.default_rng(0)
    labels, losses = rng.integers(0, 3, 20), torch.from_numpy(rng.random(20))
    class_weight = torch.tensor([0.5, 1.0, 2.5])
    index = rng.permutation(20)[:size]
    whole = (losses[index] * class_weight[labels[index]]).sum() / class_weight[labels[index]].sum()
    shares, parts = 0.0, []
    for rank in range(2):
        batch = Context(rank=rank, world_size=2).batch(index, labels, class_weight)
        w = class_weight[labels[batch.index]]
        mean = (losses[batch.index] * w).sum() / w.sum() if len(batch.index) else torch.tensor(float("nan"))
        parts.append(batch.loss(mean, losses[batch.index]))
        shares += batch.share
    assert torch.isclose(sum(parts) / 2, whole)  # what DDP's gradient average sees
    assert shares == size
    assert Context().batch(index, labels, class_weight) == Batch(index, float(size), 1.0)


def test_each_rank_drops_out_its_rows_of_the_one_process_mask():
    x = torch.randn(7, 16)
    torch.manual_seed(3)
    whole = torch.nn.Dropout(0.4).train()(x)
    parts = []
    for rank in range(2):
        rows = Context(rank=rank, world_size=2).shard(7)
        torch.manual_seed(3)  # every rank's generator is in the same state
        parts.append(ShardDropout(0.4, rows, 7).train()(x[rows]))
    assert torch.equal(torch.cat(parts), whole)
    assert torch.equal(ShardDropout(0.4, slice(0, 3), 7).eval()(x[:3]), x[:3])


def test_a_batch_that_does_not_split_evenly_and_a_gpu_for_every_rank_are_refused():
    with pytest.raises(ConfigError, match=r"batch_size 30 is not a multiple of the world size 4.*--batch-size 32"):
        Context(rank=0, world_size=4).device("cpu", 30)
    with pytest.raises(ConfigError, match="names one GPU for every rank"):
        Context(rank=0, world_size=2, local_world_size=2).device("cuda:0", 32)
    assert Context(rank=1, world_size=2).device("cpu", 32) == torch.device("cpu")


def test_resume_refuses_another_world_size(tmp_path):
    from transferkit.training.recipe import resumed_config

    (tmp_path / "model.json").write_text(json.dumps({"format_version": 2, "status": "interrupted", "data": "d",
                                                     "world_size": 2, "config": {}}))
    with pytest.raises(ConfigError, match="trained by 2 process\\(es\\), not 1; resume it with the same world size"):
        resumed_config(tmp_path, "d", None, {}, 1)
    assert resumed_config(tmp_path, "d", None, {}, 2).batch_size == 32


def test_the_failure_reported_is_the_cause_not_its_consequences(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    def failure(rank, exitcode, message=None):
        path = tmp_path / f"error-{rank}.json"
        if message:
            path.write_text(json.dumps({"message": message, "timestamp": "100"}))
        return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file=str(path))

    lost = failure(0, 2, "rank 0: lost contact with the other ranks (Connection closed by peer); another rank stopped first")
    assert describe_failure({0: lost, 1: failure(1, -signal.SIGKILL), 2: failure(2, 143)}) == \
        "rank 1 (pid 1001) was killed by SIGKILL (by a user, or by the kernel when memory ran out); the job stopped"
    assert describe_failure({0: lost, 3: failure(3, 2, "rank 3: data/x.png: cannot read")}) == \
        "rank 3 (pid 1003) failed: data/x.png: cannot read; the job stopped"
    assert describe_failure({1: failure(1, 1)}) == "rank 1 (pid 1001) failed with exit status 1; the job stopped"
    # the race of a user error in both ranks: each wrote its error, the launcher's SIGTERM found them still exiting
    assert describe_failure({0: failure(0, -signal.SIGTERM), 1: failure(1, -signal.SIGTERM, "rank 1: batch_size 7 is bad")}) \
        == "rank 1 (pid 1001) failed: batch_size 7 is bad; the job stopped"


@pytest.mark.slow
def test_a_user_error_in_the_ranks_is_one_line_from_the_launcher(data, tmp_path):
    result = subprocess.run([sys.executable, "-m", "transferkit", "train", str(data), "--out", str(tmp_path / "run"),
                             "--nproc", "2", "--batch-size", "7"], env=environment(), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.fullmatch(
        r"error: rank [01] \(pid \d+\) failed: batch_size 7 is not a multiple of the world size 2: each rank trains on "
        r"batch_size / 2 images of every step; use e.g. --batch-size 8; the job stopped", lines[0]), result.stderr
    assert not (tmp_path / "run").exists()
