"""The run folder: what `train` writes and every other command reads.

    model.safetensors   the weights (no pickle)
    model.json          classes, preprocessing, threshold, temperature, settings, versions and the
                        weights' SHA-256, checked on every load
    history.csv, metrics.json, skipped.csv, val_predictions.csv, learning_curves.png, report.html
    checkpoint.json + checkpoint-EPOCH.safetensors   while training: what --resume continues from

model.json's "status" is "running", "interrupted" or "complete"; it is the last file a run writes,
and only a complete run is loaded. Every file is written to a temporary name and renamed into place. This module imports torch only
where weights are read or written, so that an ONNX engine loads without it.
"""

from __future__ import annotations

import csv
import json
import os
import platform
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..cfg.service import ENGINES
from ..utils.errors import RunError
from ..utils.files import atomic_path, sha256_of, write_text
from .engine import Engine, check_meta, is_multilabel

FORMAT_VERSION = 2
WEIGHTS, META, EXPORT, CHECKPOINT = "model.safetensors", "model.json", "model.onnx", "checkpoint.json"
EXPORTS = {"openvino": "model.xml", "onnx": EXPORT}  # the exports `--engine auto` looks for in a run folder
AUTO_ORDER = ("openvino", "onnx")  # fastest first; bench/engines.py measures it (docs/deploy.md: not yet done)
ENGINE_NAMES = {"openvino": "OpenVINO", "onnx": "ONNX Runtime"}
RUNNING, INTERRUPTED, COMPLETE = "running", "interrupted", "complete"  # model.json's "status"


def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def status_of(run_dir: str | Path) -> str | None:
    """"running", "interrupted" or "complete"; None where there is no readable model.json."""
    meta = read_json(Path(run_dir) / META)
    return None if meta is None else meta.get("status")


def resume_command(meta: dict, run_dir) -> str:
    val = f" --val-dir {meta['val_data']}" if meta.get("val_data") else ""
    nproc = f" --nproc {meta['world_size']}" if meta.get("world_size", 1) > 1 else ""  # or the same torchrun
    return f"transferkit train {meta.get('data', 'DATA')} --out {run_dir}{val} --resume{nproc}"


def start(run_dir: str | Path, meta: dict) -> None:
    """Mark a run folder as being written: model.json with the status "running"."""
    write_text(Path(run_dir) / META, json.dumps({"format_version": FORMAT_VERSION, "status": RUNNING, **meta},
                                                indent=2) + "\n")


def set_status(run_dir: str | Path, status: str) -> None:
    path = Path(run_dir) / META
    meta = read_json(path) or {"format_version": FORMAT_VERSION}
    write_text(path, json.dumps({**meta, "status": status}, indent=2) + "\n")


def prepare(out: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """The folder this run writes to, decided before any work: `out` itself, or a staging folder
    beside it (`.NAME.new`) when `out` holds a complete run that `overwrite` will replace only once
    the new run is complete. Refuses to overwrite a complete run silently, to start over an
    unfinished one without `overwrite`, to resume where there is nothing to resume, and to write
    into a folder that is not a run folder."""
    out = Path(out)
    staged = out.with_name(f".{out.name}.new")
    if resume:
        for candidate in (staged, out):
            if status_of(candidate) in (RUNNING, INTERRUPTED):
                return candidate
        raise RunError(f"{out}: nothing to resume (no interrupted run there; status "
                       f"{status_of(out) or 'none'})")
    status = status_of(out)
    if status == COMPLETE and not overwrite:
        raise RunError(f"{out}: holds a complete run; choose another --out, or pass --overwrite to replace it "
                       "(it stays usable until the new run completes)")
    if status in (RUNNING, INTERRUPTED) and not overwrite:
        raise RunError(f"{out}: holds an unfinished run ({status}); continue it with --resume, or start again "
                       "with --overwrite")
    if status is None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise RunError(f"{out}: exists and is not a transferkit run folder; choose a new or empty folder")
    if status == COMPLETE:
        shutil.rmtree(staged, ignore_errors=True)
        return staged
    if status is not None:  # an unfinished run, replaced as asked: nothing usable is lost
        shutil.rmtree(out)
    return out


def finish(work: Path, out: Path) -> None:
    """Put a completed run in place: a staged run replaces the old one (which stayed usable until
    now); checkpoints go."""
    remove_checkpoints(work)
    if work == out:
        return
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    os.replace(work, out)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(run_dir: str | Path, tensors: dict, state: dict) -> None:
    """Everything needed to continue after epoch `state["epoch"]`: the tensors (weights, optimizer,
    RNG) in checkpoint-EPOCH.safetensors, the rest in checkpoint.json, which names that file and
    its hash. Each is written atomically, the JSON last, so a kill at any moment leaves the last
    complete checkpoint usable."""
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    name = f"checkpoint-{state['epoch']}.safetensors"
    with atomic_path(run_dir / name) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))
        digest = sha256_of(tmp)
    write_text(run_dir / CHECKPOINT, json.dumps({**state, "tensors": name, "tensors_sha256": digest}) + "\n")
    for old in run_dir.glob("checkpoint-*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)


def load_checkpoint(run_dir: str | Path) -> tuple[dict, dict] | None:
    """(tensors, state) of the last complete checkpoint, or None when there is none."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    state = read_json(run_dir / CHECKPOINT)
    if state is None:
        return None
    tensors = run_dir / str(state.get("tensors"))
    if not tensors.is_file() or sha256_of(tensors) != state.get("tensors_sha256"):
        raise RunError(f"{tensors}: missing or damaged checkpoint; train again with --overwrite")
    return load_file(str(tensors)), state


def remove_checkpoints(run_dir: str | Path) -> None:
    run_dir = Path(run_dir)
    for path in [run_dir / CHECKPOINT, *run_dir.glob("checkpoint-*.safetensors")]:
        path.unlink(missing_ok=True)


def versions() -> dict[str, str]:
    import timm
    import torch

    return {"transferkit": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def save_weights(classifier, run_dir: str | Path) -> None:
    """Write the classifier's weights; its metadata gains their SHA-256 and the versions."""
    from safetensors.torch import save_file

    model = classifier.model
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(Path(run_dir) / WEIGHTS) as tmp:
        save_file(state, str(tmp))
        digest = sha256_of(tmp)
    classifier.meta = {
        "format_version": FORMAT_VERSION,
        "classes": classifier.classes,
        "num_outputs": model.head.out_features,
        "dropout": model.dropout.p,
        "augmentation": {"flip": model.augment.flip, "rotation": model.augment.rotation},
        **classifier.meta,
        "model_sha256": digest,
        "model_version": digest[:16],
        "versions": versions(),
    }


def mark_complete(classifier, run_dir: str | Path) -> None:
    """Write model.json with the status "complete": the last file a run writes, so that a run
    folder is either complete or resumable, never half-usable."""
    classifier.meta = {**classifier.meta, "status": COMPLETE}
    write_text(Path(run_dir) / META, json.dumps(classifier.meta, indent=2) + "\n")


def read_meta(run_dir: str | Path) -> dict:
    """model.json, with every value a prediction depends on checked."""
    run_dir = Path(run_dir)
    path = run_dir / META
    if not path.is_file():
        raise RunError(f"{path}: not found (is {run_dir} a transferkit run folder?)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RunError(f"{path}: unreadable ({exc})") from None
    if not isinstance(meta, dict):
        raise RunError(f"{path}: not a JSON object")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise RunError(f"{path}: format_version {version!r}, this transferkit reads {FORMAT_VERSION}"
                       + (" (an older run: train it again)" if isinstance(version, int) and version < FORMAT_VERSION else ""))
    if meta.get("status") != COMPLETE:
        raise RunError(f"{run_dir}: the run is {meta.get('status') or 'incomplete'}, not complete (killed or "
                       f"interrupted, or still training); continue it: {resume_command(meta, run_dir)}")
    for key in ("backbone", "model_sha256"):
        if key not in meta:
            raise RunError(f"{path}: no {key!r}")
    check_meta(meta, path)
    return meta


def load(run_dir: str | Path, device: str = "cpu"):
    """The PyTorch classifier of a run folder, after checking its metadata and its weights' hash."""
    if is_anomaly_run(run_dir):
        raise RunError(f"{run_dir}: an anomaly run (--task anomaly), not a classifier; this command needs a "
                       "classifier run (an anomaly run takes predict, evaluate --normal-class and explain)")
    import torch
    from safetensors.torch import load_file

    from ..models.backbones import Preprocess, timm_model
    from ..models.transfer import TransferModel
    from .classifier import Classifier

    run_dir = Path(run_dir)
    meta = read_meta(run_dir)
    weights = run_dir / WEIGHTS
    if not weights.is_file():
        raise RunError(f"{weights}: not found (is {run_dir} a transferkit run folder?)")
    if sha256_of(weights) != meta["model_sha256"]:
        raise RunError(f"{weights}: does not match the SHA-256 in {META} (damaged or replaced); "
                       "restore it or train again")
    try:
        backbone = timm_model(meta["backbone"], num_classes=0, **meta.get("timm_kwargs", {}))
        preprocess = Preprocess(**{k: meta["preprocess"][k] for k in ("image_size", "mean", "std")})
        model = TransferModel(backbone, len(meta["classes"]), preprocess,
                              dropout=meta["dropout"], multilabel=is_multilabel(meta), **meta["augmentation"])
        model.load_state_dict(load_file(str(weights)))
    except Exception as exc:  # noqa: BLE001 - any inconsistency means an unusable run
        raise RunError(f"{run_dir}: cannot load the model ({type(exc).__name__}: {exc})") from exc
    model.to(device, memory_format=torch.channels_last)
    return Classifier(model, meta["classes"], meta)


def is_anomaly_run(run_dir: str | Path) -> bool:
    """Whether `run_dir` holds an anomaly run (model.json's task "anomaly"; predict/anomaly_engine.py)."""
    meta = read_json(Path(run_dir) / META) if Path(run_dir).is_dir() else None
    return meta is not None and meta.get("task") == "anomaly"


def model_version(run_dir: str | Path) -> str:
    """The first 16 hex digits of the weights' SHA-256: names exactly one trained model."""
    return sha256_of(Path(run_dir) / WEIGHTS)[:16]


def stale_reason(onnx: Engine, run_dir: Path) -> str | None:
    """Why an exported file no longer matches its run (other weights, threshold, temperature)."""
    current = read_meta(run_dir)
    if (run_dir / WEIGHTS).is_file() and model_version(run_dir) != onnx.version:
        return "the weights changed since the export"
    for key in ("threshold", "temperature"):
        now, then = np.atleast_1d(current[key]).astype(float), np.atleast_1d(onnx.meta[key]).astype(float)
        if now.shape != then.shape or (np.abs(now - then) > 1e-9).any():
            return f"model.json's {key} changed since the export"
    return None


def open_export(kind: str, path: Path, threads: int | None = None) -> Engine:
    """An exported file as its engine: "onnx" (ONNX Runtime) or "openvino" (an IR's .xml)."""
    if kind == "openvino":
        from .openvino_engine import OpenVinoClassifier

        return OpenVinoClassifier(path, threads)
    from .onnx_engine import OnnxClassifier

    return OnnxClassifier(path, threads)


def load_engine(run: str | Path, engine: str = "auto", log: Callable[[str], None] | None = None,
                threads: int | None = None) -> Engine:
    """A run folder (or an exported .onnx or OpenVINO .xml file) as a classifier. "auto": the
    fastest exported engine whose file exists, loads and matches the run (AUTO_ORDER, measured in
    docs/deploy.md), else PyTorch, with a note for each export passed over; "onnx" or "openvino"
    without a usable export is an error."""
    run = Path(run)
    if engine not in ENGINES:
        raise RunError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    kind = {".onnx": "onnx", ".xml": "openvino"}.get(run.suffix)
    if kind is not None:
        if engine not in ("auto", kind):
            raise RunError(f"{run}: an exported {kind} file needs the {kind} or auto engine")
        return open_export(kind, run, threads)
    if engine == "torch":
        return load(run)
    passed = []  # (file, why) of the exports auto passed over
    for kind in AUTO_ORDER if engine == "auto" else (engine,):
        exported = run / EXPORTS[kind]
        if not exported.is_file():
            if engine == kind:
                option = "" if kind == "onnx" else f" --format {kind}"
                raise RunError(f"{exported}: not found; run `transferkit export {run}{option}` first (or use the "
                               "torch engine)")
            continue
        try:
            chosen = open_export(kind, exported, threads)
        except RunError as exc:  # damaged (an interrupted copy, say), or its package missing
            if engine == kind:
                raise
            passed.append((exported, f"is not usable ({exc})"))
            continue
        reason = stale_reason(chosen, run)
        if reason is None:
            note_passed(passed, ENGINE_NAMES[kind], log)
            return chosen
        if engine == kind:
            raise RunError(f"{exported}: out of date ({reason}); export again")
        passed.append((exported, f"is out of date ({reason})"))
    note_passed(passed, "PyTorch", log)
    return load(run)


def note_passed(passed: list[tuple[Path, str]], using: str, log: Callable[[str], None] | None) -> None:
    for exported, problem in passed if log else ():
        log(f"note: {exported} {problem}; using {using} (export again to use it)")


def write_predictions(path: str | Path, paths: list[str], labels: np.ndarray, probabilities: np.ndarray,
                      classes: list[str], sep: str = "|") -> None:
    """One row per image: path, true class (multi-label: a `labels` column, the true classes joined
    by `sep`), the probability of every class."""
    multilabel = labels.ndim == 2
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "labels" if multilabel else "label", *[f"p_{c}" for c in classes]])
        for p, y, row in zip(paths, labels, probabilities):
            truth = sep.join(c for c, on in zip(classes, y) if on) if multilabel else classes[y]
            writer.writerow([p, truth, *[f"{v:.6g}" for v in row]])


def read_predictions(path: str | Path, classes: list[str], sep: str = "|") -> tuple[list[str], np.ndarray, np.ndarray]:
    """What `write_predictions` wrote: (paths, labels, probabilities)."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        if rows and "labels" in rows[0]:
            labels = np.array([[c in (r["labels"].split(sep) if r["labels"] else []) for c in classes]
                               for r in rows], dtype=np.uint8).reshape(-1, len(classes))
        else:
            labels = np.array([classes.index(r["label"]) for r in rows], dtype=np.int64)
        probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows], dtype=np.float64)
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, ValueError, TypeError) as exc:
        raise RunError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    return [r["path"] for r in rows], labels, probs.reshape(-1, len(classes))


def write_skipped(path: str | Path, skipped: list[tuple[str, str]]) -> None:
    """The files that were skipped and why, as CSV (any character in a name survives)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "reason"])
        writer.writerows(skipped)


def read_skipped(path: str | Path) -> list[tuple[str, str]]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return [(r["path"], r["reason"]) for r in csv.DictReader(fh)]
    except (OSError, UnicodeDecodeError, csv.Error, KeyError) as exc:
        raise RunError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
