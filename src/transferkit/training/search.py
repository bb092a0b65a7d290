"""`--preset best`: the default recipe first, then the candidates that the benchmark suite says
accuracy comes from (deeper fine-tuning, then bigger offline backbones at their own, higher
resolution), each only when its estimated time fits in what is left of `--time-budget`. Every candidate validates on the same
images (the split depends on the seed and the labels alone), and the one kept is the best on the
monitored validation number, so `best` never returns a model worse on validation than the
default's. Ctrl-C ends the search with the best completed candidate.

The search is a loop over the recipe's one entry point for a run (recipe.train_run), which
recipe.train hands it; `fast` and `default` are one run of the recipe.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..cfg.settings import BEST_BUDGET_MINUTES, TrainConfig, default_of
from ..predict import run
from ..predict.classifier import Classifier
from ..utils.errors import Interrupted, TransferkitError
from ..utils.files import write_text
from ..utils.progress import Reporter
from .callbacks import is_better


@dataclass(frozen=True)
class Candidate:
    name: str
    settings: dict  # what it changes from the default
    cost: float  # its training time relative to the default's
    default_backbone: bool = False  # meant for the default backbone at its own size only


# In the order tried: the most accuracy for its time first (docs/benchmarks.md, "Benchmark suite").
# Costs are training times (model.json's training_seconds) over the default's, measured on ELPV,
# 3 seeds each, back to back on one quiet machine (default 165 s, 86.1 %): fine-tuning from block 4
# of EfficientNet-Lite0 (layer 48, not the last quarter) 315 s, 87.9 % (digits: 98.3 % against
# 97.3 %); EfficientNet-Lite1 at its 240 px 318 s, 87.6 %; Lite2 at 260 px 412 s, 87.4 %.
CANDIDATES = (
    Candidate("default", {}, 1.0),
    Candidate("fine-tuning from block 4", {"fine_tune_at": "blocks.4.0.conv_pw"}, 1.91, default_backbone=True),
    Candidate("EfficientNet-Lite1 at 240 px", {"backbone": "tf_efficientnet_lite1"}, 1.93, default_backbone=True),
    Candidate("EfficientNet-Lite2 at 260 px", {"backbone": "tf_efficientnet_lite2"}, 2.50, default_backbone=True),
)


def search(train_run: Callable[..., Classifier], data, out: Path, config: TrainConfig, val_data, reporter: Reporter,
           overwrite: bool) -> Classifier:
    """The budgeted search: each candidate is one `train_run` (the recipe's, with the candidate's
    settings) into a side folder; the best on validation becomes `out`."""
    budget = 60 * (config.time_budget or BEST_BUDGET_MINUTES)
    work = run.prepare(out, overwrite=overwrite)  # refuses before any work, as a plain run does
    side = out.with_name(f".{out.name}.best")
    shutil.rmtree(side, ignore_errors=True)
    started, tried, kept = time.perf_counter(), [], None
    try:
        for i, candidate in enumerate(CANDIDATES):
            left = budget - (time.perf_counter() - started)
            pinned = [k for k in (*candidate.settings, *(("backbone", "weights", "image_size")
                                                           if candidate.default_backbone else ()))
                      if getattr(config, k) != default_of(k)]
            if pinned:  # not a candidate that would undo what you chose
                reporter.log(f"Best: skipping {candidate.name}: you set {pinned[0]}")
                tried.append({"name": candidate.name, "skipped": f"you set {pinned[0]}"})
                continue
            estimate = tried[0]["seconds"] * candidate.cost if tried else None
            if estimate is not None and estimate > left:
                reporter.log(f"Best: skipping {candidate.name}: estimated {estimate:.0f}s, {left:.0f}s of the budget left")
                tried.append({"name": candidate.name, "skipped": f"estimated {estimate:.0f}s, {left:.0f}s left"})
                continue
            reporter.log(f"Best: trying {candidate.name}"
                         + (f" (estimated {estimate:.0f}s)" if estimate else " (always: the reference)")
                         + f"; {left:.0f}s of the {budget:.0f}s budget left")
            settings = {**config.to_dict(), "preset": "default", "time_budget": None, **candidate.settings}
            folder, began = side / str(i) / out.name, time.perf_counter()  # the report is titled by the folder's name
            try:
                train_run(data, folder, TrainConfig.from_dict(settings), val_data, reporter)
            except TransferkitError as exc:
                if kept is None:  # the reference itself: the data or a setting is wrong
                    raise
                reporter.log(f"Best: {candidate.name} failed ({exc}); going on without it")
                tried.append({"name": candidate.name, "failed": str(exc)})
                continue
            row = kept_row(folder, config.monitor)
            tried.append({"name": candidate.name, "settings": candidate.settings, "folder": folder,
                          "seconds": round(time.perf_counter() - began, 1),
                          **({"estimated_seconds": round(estimate, 1)} if estimate else {}), **row})
            if kept is None or is_better(row, kept, config.monitor):
                kept = tried[-1]
            reporter.log(f"Best: {candidate.name}: validation {config.monitor} {row[config.monitor]:.4f} "
                         f"(accuracy {row['val_accuracy']:.4f}); keeping {kept['name']}")
    except Interrupted:
        if kept is None:
            shutil.rmtree(side, ignore_errors=True)
            raise
        reporter.log(f"Best: interrupted; keeping {kept['name']}, the best completed candidate")
    except BaseException:
        shutil.rmtree(side, ignore_errors=True)
        raise
    chosen = kept
    if work.exists():
        work.rmdir()  # prepare leaves an empty or no folder
    os.replace(chosen["folder"], work)
    summary = [{**{k: v for k, v in c.items() if k != "folder"}, "kept": c is chosen} for c in tried]
    write_text(work / "search.json", json.dumps({"budget_seconds": budget, "monitor": config.monitor,
                                                 "seconds": round(time.perf_counter() - started, 1),
                                                 "candidates": summary}, indent=2) + "\n")
    run.finish(work, out)
    shutil.rmtree(side, ignore_errors=True)
    reporter.log(f"Best: kept {chosen['name']} of {sum('seconds' in c for c in tried)} candidate(s) in "
                 f"{time.perf_counter() - started:.0f}s; see {out}/search.json")
    return run.load(out)


def kept_row(folder: Path, monitor: str) -> dict:
    """The kept epoch's validation numbers of a completed run (its history.csv)."""
    best = run.read_json(folder / run.META)["best_epoch"]
    with open(folder / "history.csv", newline="") as fh:
        row = next(r for r in csv.DictReader(fh) if int(r["epoch"]) == best)
    return {k: float(row[k]) for k in ("val_loss", "val_accuracy", monitor) if row.get(k) not in (None, "")}
