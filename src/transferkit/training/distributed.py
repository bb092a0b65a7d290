"""The recipe data-parallel on torchrun: PyTorch's own engine (torch.distributed with c10d
rendezvous, gloo on CPU, NCCL on CUDA, DistributedDataParallel); only what is ours is written here.

Every rank runs the same recipe; at a few points it asks `current()`, which in one process (no
torchrun) answers as if this module were not there:
- rank 0 prepares the run folder, lists the files, checks the labels and reads a checkpoint; the
  other ranks receive its result, or the same one-line error (`on_main`);
- each rank decodes, then extracts, one contiguous shard of the images; the shards are gathered, so
  every rank then holds what the one process holds (`decode`, `extract`);
- every rank draws the one process's global order; each global batch of B images gives each rank
  its B / world-size rows, weighted so that the gradient DDP averages is the one process's batch
  gradient, and dropout draws the whole batch's mask and keeps its rows (`batch`, `replicate`);
- what trains is wrapped in DistributedDataParallel for each phase (`replicate`);
- validation is sharded and gathered (`predict_logits`), epoch sums are all-reduced (`sum`);
- only rank 0 writes the run folder, the report and the cross-run cache's index (`main`); the
  other ranks write only their own shard's views, and spill to a private scratch folder.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..cfg.environment import LAUNCHED
from ..data.listing import LabelledImages
from ..data.memory import allocate
from ..data.window import HighBit
from ..models.inference import predict_logits
from ..utils.errors import ConfigError, RunError, TransferkitError

TIMEOUT = timedelta(minutes=10)  # a rank that stops answering without dying (a lost node) ends the job
CHUNK_BYTES = 64 << 20  # gathers move at most this much per rank and message
LOST = "lost contact with the other ranks"  # the start of a failure that another rank caused


@dataclass
class Context:
    """This process's place in the job: torchrun's RANK, WORLD_SIZE, LOCAL_RANK and
    LOCAL_WORLD_SIZE (one process without torchrun: 0, 1, 0, 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launched: bool = False  # by torchrun: a job even with one rank (DDP, NCCL: what a one-GPU check runs)
    scratch_dir: Path | None = None  # rank > 0: where it spills, instead of the run folder
    rows: tuple[slice, int] = (slice(None), 0)  # this rank's rows of the current global batch, and its size

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.launched or self.world_size > 1

    # -- the job ------------------------------------------------------------------------------

    def device(self, setting: str, batch_size: int) -> torch.device:
        """The device of this rank of a job: one GPU per local rank (`auto` or `cuda`, NCCL), else
        the CPU (gloo); checks that each rank gets an equal part of every batch."""
        if batch_size % self.world_size:
            raise ConfigError(f"batch_size {batch_size} is not a multiple of the world size {self.world_size}: "
                              f"each rank trains on batch_size / {self.world_size} images of every step; "
                              f"use e.g. --batch-size {batch_size + self.world_size - batch_size % self.world_size}")
        if setting.startswith("cuda:") and self.local_world_size > 1:
            raise ConfigError(f"device {setting!r} names one GPU for every rank; use --device cuda (or auto): "
                              "each local rank takes its own GPU")
        if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if setting != "auto" and setting.partition(":")[0] != "cuda":
            raise ConfigError(f"device {setting!r} cannot run a torchrun job; use auto, cpu or cuda")
        index = int(setting.partition(":")[2] or self.local_rank)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if index >= count:
            raise ConfigError(f"local rank {self.local_rank} needs cuda:{index}, but this machine has {count} GPU(s): "
                              f"start at most {count} process(es) per machine, or use --device cpu")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)

    def describe(self, device: torch.device, batch_size: int) -> str:
        backend = dist.get_backend() if dist.is_initialized() else "none"
        return (f"Data-parallel: {self.world_size} rank(s), {self.local_world_size} on this machine; {device}, "
                f"process group {backend}; {batch_size // self.world_size} images per rank and step")

    def scratch(self, run_spill: Path) -> Path:
        """Where this rank spills arrays: the run's cache folder for rank 0, a private temporary
        folder (removed at exit) for the others, which write nothing in the run folder."""
        if self.main:
            return run_spill
        if self.scratch_dir is None:
            self.scratch_dir = Path(tempfile.mkdtemp(prefix=f"transferkit-rank{self.rank}-"))
            atexit.register(shutil.rmtree, self.scratch_dir, True)
        return self.scratch_dir

    @contextmanager
    def failures(self) -> Iterator[None]:
        """A collective that fails because a peer is gone (killed, out of memory, its own error)
        becomes one line naming this rank; the peer's own failure is what the launcher reports."""
        try:
            yield
        except (dist.DistError, RuntimeError) as exc:
            if not self.distributed or not (isinstance(exc, dist.DistError) or _from_backend(exc)):
                raise
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
            raise RunError(f"rank {self.rank}: {LOST} ({first}); another rank stopped first") from None

    def on_main(self, fn: Callable, *args, **kwargs):
        """`fn(*args)` on rank 0 only, its result (or its user error, raised again) on every rank."""
        if not self.distributed:
            return fn(*args, **kwargs)
        result = None
        if self.main:
            try:
                result = ("ok", fn(*args, **kwargs))
            except TransferkitError as exc:
                result = ("error", exc)
            except BaseException as exc:
                self.broadcast(("bug", f"{type(exc).__name__}: {exc}"))
                raise
        kind, value = self.broadcast(result)
        if kind == "bug":
            raise RunError(f"rank {self.rank}: rank 0 failed ({value})")
        if kind == "error":
            raise value
        return value

    # -- collectives (host memory, over gloo) ------------------------------------------------------

    def broadcast(self, value):
        with self.failures():
            box = [value]
            dist.broadcast_object_list(box, src=0)
            return box[0]

    def all_gather(self, value) -> list:
        with self.failures():
            out = [None] * self.world_size
            dist.all_gather_object(out, value)
            return out

    def sum(self, *values: float) -> tuple[float, ...]:
        """Sums over the ranks (identity in one process)."""
        if not self.distributed:
            return values
        with self.failures():
            tensor = torch.tensor(values, dtype=torch.float64)
            dist.all_reduce(tensor)
            return tuple(tensor.tolist())

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of n items (the first n % world ranks take one more)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def gather(self, part: np.ndarray | None, axis: int, make: Callable[[tuple, np.dtype], np.ndarray]) -> np.ndarray:
        """Every rank's `part` concatenated along `axis` in rank order, into `make(shape, dtype)`;
        moved as bytes in chunks of at most CHUNK_BYTES. `part` None: this rank has no rows."""
        info = None if part is None else (part.shape[axis], part.shape, part.dtype.str)
        infos = self.all_gather(info)
        known = next(i for i in infos if i is not None)
        counts = [0 if i is None else i[0] for i in infos]
        shape, dtype = list(known[1]), np.dtype(known[2])
        shape[axis] = sum(counts)
        out = make(tuple(shape), dtype)
        target = np.moveaxis(out, axis, 0)
        rows = np.moveaxis(part, axis, 0) if part is not None else np.zeros((0, *target.shape[1:]), dtype)
        row_bytes = max(1, int(np.prod(target.shape[1:])) * dtype.itemsize)
        chunk = max(1, CHUNK_BYTES // row_bytes)
        offsets = np.cumsum([0, *counts])
        for start in range(0, max(counts), chunk):
            size = min(chunk, max(counts) - start)
            mine = np.zeros((size, *target.shape[1:]), dtype)
            piece = rows[start:start + size]
            mine[:len(piece)] = piece
            tensor = torch.from_numpy(mine.reshape(size, -1).view(np.uint8))
            gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
            with self.failures():
                dist.all_gather(gathered, tensor)
            for r, g in enumerate(gathered):
                k = int(np.clip(counts[r] - start, 0, size))
                if k:
                    target[offsets[r] + start:offsets[r] + start + k] = \
                        g[:k].numpy().view(dtype).reshape(k, *target.shape[1:])
        return out

    # -- the recipe's hooks ---------------------------------------------------------------------

    def decode(self, decode: Callable[..., LabelledImages], raw: LabelledImages, size: int, *,
               spill_dir=None, budget: int, keep: bool = False, **options) -> LabelledImages:
        """`decode(raw, size, ...)` with each rank decoding its shard of the files; the result is
        the one process's (same order, same skipped list) on every rank, image keys included."""
        if not self.distributed:
            return decode(raw, size, spill_dir=spill_dir, budget=budget, keep=keep, **options)
        part = self.shard(len(raw))
        mine = decode(raw.subset(np.arange(part.start, part.stop)), size, spill_dir=spill_dir, budget=budget,
                      keep=keep, **options)
        if mine.highbit is not None:
            mine.highbit.pixels = {}  # not sent between ranks: `fill` decodes those images again
        shards = self.all_gather((mine.paths, mine.labels, mine.skipped, mine.keys(), mine.highbit,
                                  mine.notes[len(raw.notes):], mine.groups))
        images = self.gather(mine.images if len(mine) else None, 0, lambda shape, dtype: allocate(
            shape, dtype, int(np.prod(shape)) <= budget, spill_dir, keep))
        return LabelledImages(
            paths=[p for s in shards for p in s[0]], labels=np.concatenate([s[1] for s in shards]),
            classes=raw.classes, skipped=list(raw.skipped) + [k for s in shards for k in s[2]], images=images,
            notes=raw.notes + [n for s in shards for n in s[5]],
            highbit=HighBit.concat([s[4] for s in shards], [len(s[0]) for s in shards]),
            _keys=[k for s in shards for k in s[3]],
            groups=None if raw.groups is None else [g for s in shards for g in s[6]])

    def extract(self, extract: Callable, model, images: np.ndarray, views: int, *, keys: list[str],
                in_ram: bool, spill_dir=None, keep: bool = False, **options) -> tuple[np.ndarray, np.ndarray | None]:
        """`extract(model, images, views, ...)` with each rank computing its shard's views; the
        (views, images, ...) arrays are gathered on every rank."""
        common = dict(in_ram=in_ram, spill_dir=spill_dir, keep=keep, **options)
        if not self.distributed:
            return extract(model, images, views, keys=keys, **common)
        part = self.shard(len(images))
        found = extract(model, images[part], views, keys=keys[part], **common) if part.stop > part.start else None
        has_boundary = any(self.all_gather(found is not None and found[1] is not None))

        def make(shape, dtype):
            return allocate(shape, dtype, in_ram, spill_dir, keep)

        pooled = self.gather(None if found is None else found[0], 1, make)
        boundary = self.gather(None if found is None else found[1], 1, make) if has_boundary else None
        return pooled, boundary

    def predict_logits(self, model, inputs: np.ndarray, forward, batch_size: int, device) -> np.ndarray:
        """Validation: each rank the logits of its shard, gathered on every rank."""
        if not self.distributed:
            return predict_logits(model, inputs, forward, batch_size, device)
        logits = predict_logits(model, inputs[self.shard(len(inputs))], forward, batch_size, device)
        return self.gather(logits, 0, np.empty)

    def replicate(self, model, views):
        """The views of one phase with their forward wrapped in DistributedDataParallel: the head,
        and in phase 2 the unfrozen layers, are the replicated modules."""
        if not self.distributed:
            return views
        trainable = [module for _, module in model.layers[model.trainable_from:]] + [model.head]
        replica = Replica(views.forward, model, trainable, self)
        device = next(model.head.parameters()).device
        ddp = nn.parallel.DistributedDataParallel(replica, device_ids=[device.index] if device.type == "cuda" else None)
        return dataclasses.replace(views, forward=ddp)

    def batch(self, index: np.ndarray, labels: np.ndarray, class_weight: torch.Tensor | None) -> "Batch":
        """This rank's part of one global batch (`index`, in the one process's order)."""
        if not self.distributed:
            return Batch(index, float(len(index)), 1.0)
        part = self.shard(len(index))
        weights = (np.ones(len(index)) if class_weight is None or labels.ndim == 2  # multi-label: pos_weight, a plain mean
                   else class_weight.numpy().astype(np.float64)[labels[index]])
        total = weights.sum()
        self.rows = (part, len(index))
        return Batch(index[part], len(index) / self.world_size, self.world_size * weights[part].sum() / total)


@dataclass
class Batch:
    """One rank's rows of a global batch. DDP averages the ranks' gradients, so each rank's loss
    (a weighted mean over its rows) is scaled by world size x its rows' share of the batch's
    weight: the average is then the gradient of the whole batch's weighted mean. `share` is the
    rank's part of the batch in the epoch's running loss."""

    index: np.ndarray
    share: float
    scale: float

    def loss(self, loss: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        if self.scale == 1.0:
            return loss
        if not len(self.index):  # a last batch with fewer images than ranks: a zero that DDP still syncs
            return logits.sum() * 0.0
        return loss * self.scale


class ShardDropout(nn.Dropout):
    """Dropout of a rank's rows as the one process draws it: the mask of the whole global batch
    (the same draws from the same generator state on every rank), of which this rank keeps its rows.
    (CPU: ATen's dropout is `input * empty_like(input).bernoulli_(1 - p) / (1 - p)`.)"""

    def __init__(self, p: float, rows: slice, total: int):
        super().__init__(p)
        self.rows, self.total = rows, total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        noise = torch.empty((self.total, *x.shape[1:]), dtype=x.dtype, device=x.device).bernoulli_(1 - self.p)
        return x * noise.div_(1 - self.p)[self.rows]


class Replica(nn.Module):
    """What DDP replicates: the modules that train (registered here, shared with the model), and
    the forward of the cached views. While it runs, the model's dropout is a ShardDropout."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, trainable: list[nn.Module],
                 context: Context):
        super().__init__()
        self.trainable = nn.ModuleList(trainable)
        self.run, self.model, self.context = forward, [model], context  # a list: not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model[0]
        dropout = model.dropout
        model.dropout = ShardDropout(dropout.p, *self.context.rows).train(dropout.training)
        try:
            return self.run(x)
        finally:
            model.dropout = dropout


def _from_backend(exc: RuntimeError) -> bool:
    text = str(exc)
    return any(word in text for word in ("gloo", "Gloo", "NCCL", "Connection closed", "Connection reset",
                                         "Socket", "timed out", "Timed out"))


_CURRENT = Context()


def current() -> Context:
    """This process's context: set by `start()` under torchrun; one process otherwise."""
    return _CURRENT


def start() -> Context:
    """Join the job torchrun started (its environment names it), once per process: c10d with gloo
    for host memory and, where CUDA is, NCCL for GPU tensors. Without torchrun: the one process."""
    global _CURRENT
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        _CURRENT = Context()
        return _CURRENT
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo", timeout=TIMEOUT)
        atexit.register(_leave)
    if not _CURRENT.launched:
        _CURRENT = Context(dist.get_rank(), dist.get_world_size(), int(env.get("LOCAL_RANK", "0")),
                           int(env.get("LOCAL_WORLD_SIZE", "1")), launched=True)
    return _CURRENT


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# -- `transferkit train --nproc N`: torchrun's launcher on this machine --------------------------

def launch(nproc: int, args: list[str]) -> None:
    """Run `python -m transferkit ARGS` in `nproc` processes on this machine with torchrun's own
    launcher (c10d rendezvous on a free local port). A rank that fails ends the job; the failure
    that caused it becomes one RunError naming the rank and the cause."""
    import logging

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if "RANK" in os.environ:
        raise ConfigError("--nproc starts the processes itself; under torchrun leave it out")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0, monitor_interval=0.1)
    os.environ[LAUNCHED] = "1"  # the ranks leave their errors to this one line
    quiet = logging.getLogger("torch.distributed.elastic")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # its report of a failure is the multi-line form of our one line
    try:
        elastic_launch(config, sys.executable)("-m", "transferkit", *args)
    except ChildFailedError as exc:
        raise RunError(describe_failure(exc.failures)) from None
    finally:
        quiet.setLevel(level)
        del os.environ[LAUNCHED]


def describe_failure(failures: dict) -> str:
    """One line for the failure that caused the others: a rank's own error (its message), or its
    death by a signal, preferred over the ranks that then lost contact."""
    def caused(item):  # its own error, then a kill, then a stop the launcher sent, then a lost peer
        rank, failure = item
        message = str(failure.message)
        stopped = failure.exitcode in [sign * s for s in (signal.SIGTERM, signal.SIGINT) for sign in (-1, 1)] or \
            failure.exitcode - 128 in (signal.SIGTERM, signal.SIGINT)
        kind = 3 if message.startswith(f"rank {rank}: {LOST}") else 0 if has_message(failure) else 2 if stopped else 1
        return kind, failure.timestamp, rank

    rank, failure = min(failures.items(), key=caused)
    if has_message(failure):  # its own error, even when the launcher's SIGTERM found it still exiting
        cause = "failed: " + str(failure.message).removeprefix(f"rank {rank}: ")
    elif failure.exitcode < 0:
        name = failure.signal_name()
        cause = f"was killed by {name}" + (" (by a user, or by the kernel when memory ran out)"
                                           if -failure.exitcode == signal.SIGKILL else "")
    else:
        cause = f"failed with exit status {failure.exitcode}"
    return f"rank {rank} (pid {failure.pid}) {cause}; the job stopped"


def has_message(failure) -> bool:
    """The rank left its own one-line error (`cli.tell_launcher` writes the message as a string;
    torchrun's own records hold a mapping, and a rank without a file gets torchrun's placeholder)."""
    message = failure.error_file_data.get("message")
    return os.path.isfile(failure.error_file) and isinstance(message, str) and bool(message)

