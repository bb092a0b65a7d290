"""The `transferkit` command: a thin layer over the Python API.

The train options are generated from the settings' declarations (config.py). This is the one error
boundary: a `TransferkitError` (or an OSError about a named file) becomes a one-line `error: ...`
with exit status 2; anything else is a bug and keeps its traceback. Modules that import torch are
imported inside the commands that need them, so `--help` and `backbones` answer at once.
"""

from __future__ import annotations

import csv
import gc
import inspect
import json
import os
import sys
import time
import traceback
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup
from typer.exceptions import TyperException

try:  # typer >= 0.20 carries its own copy of click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import NoArgsIsHelpError, UsageError

from .cfg.environment import LAUNCHED
from .cfg.service import ENGINES, Limits
from .cfg.settings import DEFAULT_BACKBONE, TrainConfig, flag, option_name, read_settings, rule_of, settings, shown
from .utils.errors import ConfigError, Interrupted, TransferkitError


class Boundary(TyperGroup):
    """User errors as one line (exit 2); a bug with its traceback and a request to report it."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except Interrupted as exc:  # Ctrl-C or SIGTERM during a run: it was left resumable
            if not os.environ.get(LAUNCHED):  # a rank of `train --nproc`: the launcher says it
                typer.echo(str(exc), err=True)
            raise typer.Exit(exc.exit_code) from None
        except NoArgsIsHelpError:
            raise
        except UsageError as exc:  # a missing argument, a value out of range: one line as well
            fail(f"{exc.format_message()} (see {exc.ctx.command_path if exc.ctx else 'transferkit'} --help)")
        except (TyperException, typer.Exit, typer.Abort):  # --help, exit codes
            raise
        except TransferkitError as exc:
            fail(str(exc))
        except OSError as exc:
            if exc.filename is None:
                bug()
            fail(f"{exc.filename}: {exc.strerror or exc}")
        except Exception:  # noqa: BLE001 - the last resort: show it, ask for a report
            bug()


def bug():
    """Inside an `except` block: the traceback, and a request to report it; exit status 1."""
    traceback.print_exc()
    tell_launcher("a bug in transferkit: " + traceback.format_exc().strip().splitlines()[-1])
    typer.echo("This is a bug in transferkit, not a problem with your input: please report it "
               "with the traceback above.", err=True)
    raise typer.Exit(1) from None


def fail(message: str):
    tell_launcher(message)
    if not os.environ.get(LAUNCHED):  # a rank of `train --nproc`: the launcher says it once
        typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def tell_launcher(message: str) -> None:
    """Under torchrun, leave a rank's one-line error where its launcher reads the cause of a failed
    rank (TORCHELASTIC_ERROR_FILE, in the JSON form of torch.distributed.elastic's error files)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        with open(path, "w", encoding="utf-8") as fh:
            json.dump({"message": message, "timestamp": str(int(time.time()))}, fh)


app = typer.Typer(cls=Boundary, add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, evaluate and use image classifiers by transfer learning, on a CPU.")
out = Console()


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


EngineName = Enum("EngineName", {name: name for name in ENGINES}, type=str)


METAVARS = {int: "INTEGER", float: "NUMBER", str: "TEXT", "layer": "INDEX|NAME"}
OOD_KEEP_HELP = rule_of("ood_keep").help + " Default: the run's (train --ood-keep)."  # declared once, in the settings


def setting_parameters() -> list[inspect.Parameter]:
    """One command-line option per setting, from its declaration. Every option defaults to None
    ("not given"), so that a --config file's value holds unless the command line names it; values
    arrive as text and are checked, converted and explained by TrainConfig, as in Python."""
    params = []
    for name, rule, default in settings():
        is_flag = rule.kind is bool
        choices = f" ({' | '.join(rule.choices)})" if rule.choices else ""
        option = typer.Option(None, flag(name), help=f"{rule.help}{choices} [default: {shown(default)}]",
                              show_default=False, rich_help_panel=f"Settings: {rule.group}",
                              metavar=None if is_flag else METAVARS[rule.kind])
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=Optional[bool] if is_flag else Optional[str]))
    return params


def train(data: Path, out_dir: Path, config: Optional[Path], val_dir: Optional[Path], test_dir: Optional[Path],
          resume: bool, overwrite: bool, quiet: bool, nproc: Optional[int], **given):
    """Train a classifier: frozen backbone + new head, then fine-tune from --fine-tune-at."""
    from .training.recipe import train as train_run
    from .utils.progress import Reporter

    if test_dir is not None and not test_dir.exists():  # before the training, not after it
        raise ConfigError(f"{test_dir}: no such folder or CSV (--test-dir)")
    values = {**(read_settings(config) if config else {}), **{k: v for k, v in given.items() if v is not None}}
    settings_ = TrainConfig.from_dict(values, str(config) if config else None)
    asked = {k: getattr(settings_, k) for k in values}  # only what was asked for; resume checks it
    if nproc and nproc > 1:
        from .predict.run import INTERRUPTED, RUNNING, status_of
        from .training.distributed import launch
        from .utils.errors import RunError

        try:
            launch(nproc, ["train", str(data), "--out", str(out_dir), *(["--config", str(config)] if config else []),
                           *(["--val-dir", str(val_dir)] if val_dir else []), *(["--resume"] if resume else []),
                           *(["--overwrite"] if overwrite else []), *(["--quiet"] if quiet else []),
                           *arguments({k: v for k, v in given.items() if v is not None})])
        except RunError as exc:
            if status_of(out_dir) in (RUNNING, INTERRUPTED):
                raise RunError(f"{exc}; {out_dir} is resumable: the same command with --resume") from None
            raise
        evaluate_held_out(out_dir, test_dir, quiet)
        return
    if resume:
        classifier = train_run(data, out_dir, val_data=val_dir, reporter=Reporter(quiet=quiet), resume=True,
                               test_data=test_dir, **asked)
    else:
        classifier = train_run(data, out_dir, settings_, val_data=val_dir, reporter=Reporter(quiet=quiet),
                               overwrite=overwrite, test_data=test_dir)
    if classifier is None:  # a rank other than 0 of a torchrun job
        return
    if not quiet:
        typer.echo(f"Wrote {out_dir}/ (" + ("model.safetensors, bank.safetensors, model.json, metrics.json, "
                   "val_scores.csv, skipped.csv" if settings_.task == "anomaly" else "model.safetensors, model.json, "
                   "metrics.json, history.csv, learning_curves.png, skipped.csv, val_predictions.csv, report.html")
                   + ")", err=True)
    evaluate_held_out(out_dir, test_dir, quiet, classifier)


def evaluate_held_out(out_dir: Path, test_dir: Optional[Path], quiet: bool, classifier=None) -> None:
    """`train --test-dir`: the trained model's metrics on held-out images, as `evaluate` gives them,
    written to the run's test_metrics.json."""
    from .predict.run import load
    from .utils.files import write_text

    if test_dir is None:
        return
    metrics = (classifier if classifier is not None else load(out_dir)).evaluate(test_dir)
    write_text(out_dir / "test_metrics.json", json.dumps(metrics, indent=2) + "\n")
    if not quiet:
        print_metrics(test_dir, metrics)


def arguments(given: dict) -> list[str]:
    """Settings as command-line arguments again (for the ranks `--nproc` starts)."""
    args = []
    for name, value in given.items():
        option = option_name(name)
        if isinstance(value, bool):
            args.append(option if value else "--no-" + option[2:])
        else:
            args += [option, str(value)]
    return args


train.__signature__ = inspect.Signature([
    inspect.Parameter("data", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Path, default=typer.Argument(
        ..., help="Class folders (one per class), a CSV of path,label, or a CSV of path,labels (multi-label: "
                  "class names separated by --label-sep).")),
    inspect.Parameter("out_dir", inspect.Parameter.KEYWORD_ONLY, annotation=Path, default=typer.Option(
        ..., "--out", help="Run folder to write.")),
    inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
        None, "--config", help="Settings from a YAML/JSON file, or a run's model.json to rerun it; "
                               "options on the command line win.")),
    inspect.Parameter("val_dir", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
        None, help="Separate validation folder/CSV (else a stratified split).")),
    inspect.Parameter("test_dir", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path], default=typer.Option(
        None, help="Held-out labelled folder/CSV: after training, its metrics (as `evaluate` gives them) are "
                   "printed and written to the run's test_metrics.json; test images that are near-duplicates of "
                   "training images are named in a warning first (and in the run's check.json).")),
    inspect.Parameter("resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, "--resume", help="Continue the interrupted (or killed) run in --out from its last epoch, with its own "
                                "settings.")),
    inspect.Parameter("overwrite", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, "--overwrite", help="Replace the run in --out (a complete one stays usable until the new one "
                                   "completes).")),
    inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, annotation=bool, default=typer.Option(
        False, help="Only errors.")),
    inspect.Parameter("nproc", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[int], default=typer.Option(
        None, min=1, help="Train data-parallel in N processes on this machine (starts torchrun's launcher; "
                          "several machines: torchrun ... -m transferkit train).")),
    *setting_parameters(),
])
train.__annotations__ = {p.name: p.annotation for p in train.__signature__.parameters.values()}
app.command()(train)


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="Run folder written by `train`."),
    data: Path = typer.Argument(..., help="Labelled class folders or CSV."),
    output: Optional[Path] = typer.Option(None, "--output", help="Also write the metrics as JSON."),
    tta: bool = typer.Option(False, help="Test-time augmentation: average each image with its mirror."),
    normal_class: Optional[str] = typer.Option(None, "--normal-class", help="Anomaly runs: the class folder of "
                                               "normal images (default: the run's); every other class is anomalous."),
    ood_dir: Optional[Path] = typer.Option(None, "--ood-dir", help="Images unlike the training ones (any folder): "
                                           "how well the OOD score tells them from DATA (AUROC, FPR at 95 % TPR) "
                                           "and the fraction flagged unknown."),
    ood_keep: Optional[float] = typer.Option(None, "--ood-keep", help=OOD_KEEP_HELP),
    coverage: Optional[float] = typer.Option(None, "--coverage", help="Conformal sets at this coverage: their "
                                             "empirical coverage and mean size on DATA (default 0.9 where the run "
                                             "has sets)."),
):
    """Metrics of a trained model on another labelled folder (with the OOD score and conformal
    sets where the run has them)."""
    from .predict.run import is_anomaly_run, load
    from .utils.files import write_text

    if is_anomaly_run(run) or normal_class is not None:
        from .predict.anomaly_engine import load_detector

        metrics = load_detector(run).evaluate(data, normal_class, tta=tta)
        if output:
            write_text(output, json.dumps(metrics, indent=2) + "\n")
        print_metrics(data, metrics, tta)
        return
    if ood_dir is not None and not ood_dir.is_dir():
        raise ConfigError(f"{ood_dir}: no such folder (--ood-dir)")
    classifier = load(run).configure(ood_keep, coverage)
    if coverage is None and classifier.open_world.conformal_scores is not None and not classifier.multilabel:
        classifier.configure(coverage=0.9)
    metrics = classifier.evaluate(data, tta=tta, ood_dir=ood_dir)
    if output:
        write_text(output, json.dumps(metrics, indent=2) + "\n")
    print_metrics(data, metrics, tta)
    print_open_world(metrics, classifier)


def print_open_world(metrics: dict, classifier) -> None:
    """`evaluate`'s lines on the OOD score and the conformal sets."""
    found = metrics.get("ood")
    if found is None:
        out.print(f"note: {classifier.origin} was trained before OOD scores and conformal sets (train it again to get "
                  "them)", markup=False, soft_wrap=True)
        return
    out.print(f"OOD: threshold {found['threshold']:.4f} (keeps {found['keep']:.0%} of validation), "
              f"{found['flagged']:.1%} of these images flagged unknown", markup=False, soft_wrap=True)
    if "ood_dir" in found:
        line = f"--ood-dir {found['ood_dir']}: {found['n_ood_dir']} images, {found['flagged_ood_dir']:.1%} flagged unknown"
        if "auroc" in found:
            line += f"; AUROC {found['auroc']:.4f}, FPR at 95% TPR {found['fpr_at_95_tpr']:.4f}"
        out.print(line, markup=False, soft_wrap=True)
    sets = metrics.get("conformal")
    if sets:
        low, high = sets["coverage_ci95"]
        size = sets["mean_set_size_ci95"] or [float("nan")] * 2
        out.print(f"conformal sets at coverage {sets['target']:g}: empirical coverage {sets['coverage']:.4f} "
                  f"(95% CI {low:.4f}-{high:.4f}), mean set size {sets['mean_set_size']:.3f} "
                  f"(95% CI {size[0]:.3f}-{size[1]:.3f})", markup=False, soft_wrap=True)


def print_metrics(data: Path, metrics: dict, tta: bool = False) -> None:
    """`evaluate`'s summary: the headline numbers, the per-class table and the confusion matrix."""
    if metrics.get("task") == "anomaly":
        print_anomaly(data, metrics)
        return
    if metrics.get("task") == "multilabel":
        print_multilabel(data, metrics, tta)
        return
    low, high = metrics["accuracy_ci95"]
    out.print(f"{data}: {metrics['n']} images{' (TTA)' if tta else ''}, accuracy {metrics['accuracy']:.4f} "
              f"(95% CI {low:.4f}-{high:.4f}), balanced accuracy {metrics['balanced_accuracy']:.4f}, "
              f"loss {metrics['loss']:.4f}, ECE {metrics['ece']:.4f}", markup=False, soft_wrap=True)
    if metrics.get("roc_auc") is not None:
        out.print(f"ROC-AUC {metrics['roc_auc']:.4f}, average precision {metrics['average_precision']:.4f} "
                  f"({metrics['positive_class']} positive), threshold {metrics['threshold']:.4f}",
                  markup=False, soft_wrap=True)
    for k, value in metrics.get("top_k_accuracy", {}).items():
        out.print(f"top-{k} accuracy {value:.4f}")
    table = Table()
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, row in metrics["per_class"].items():
        table.add_row(name, f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}",
                      str(row["support"]))
    out.print(table)
    cm = metrics["confusion_matrix"]
    out.print("confusion matrix (rows: true, columns: predicted)", cm["labels"])
    for name, row in zip(cm["labels"], cm["rows_true_cols_predicted"]):
        out.print(f"  {name}: {row}")
    print_skipped(metrics)


def print_multilabel(data: Path, metrics: dict, tta: bool) -> None:
    """`evaluate`'s summary for a multi-label model."""
    low, high = metrics["accuracy_ci95"]
    out.print(f"{data}: {metrics['n']} images{' (TTA)' if tta else ''}, mAP {metrics['map']:.4f}, micro-F1 "
              f"{metrics['f1_micro']:.4f}, macro-F1 {metrics['f1_macro']:.4f}, subset accuracy "
              f"{metrics['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f}), Hamming loss {metrics['hamming_loss']:.4f}, "
              f"loss {metrics['loss']:.4f}, ECE {metrics['ece']:.4f}", markup=False, soft_wrap=True)
    card = metrics["label_cardinality"]
    out.print(f"labels per image: {card['true']:.3f} true, {card['predicted']:.3f} predicted", markup=False)
    table = Table()
    for column in ("class", "threshold", "precision", "recall", "f1", "AP", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, row in metrics["per_class"].items():
        ap = "n/a" if row["average_precision"] is None else f"{row['average_precision']:.4f}"
        table.add_row(name, f"{metrics['thresholds'][name]:.4f}", f"{row['precision']:.4f}", f"{row['recall']:.4f}",
                      f"{row['f1']:.4f}", ap, str(row["support"]))
    out.print(table)
    print_skipped(metrics)


def print_anomaly(data: Path, metrics: dict) -> None:
    """`evaluate`'s summary for an anomaly run."""
    def ci(key: str) -> str:
        return f"{metrics[key]:.4f} (95% CI {metrics[key + '_ci95'][0]:.4f}-{metrics[key + '_ci95'][1]:.4f})"

    out.print(f"{data}: {metrics['n']} images ({metrics['n_normal']} normal: {metrics['normal_class']}, "
              f"{metrics['n_anomalous']} anomalous), AUROC {ci('auroc')}, average precision {ci('average_precision')}",
              markup=False, soft_wrap=True)
    out.print(f"at the threshold {metrics['threshold']:.4f}: F1 {ci('f1')}, false-alarm rate {ci('false_alarm_rate')}, "
              f"miss rate {ci('miss_rate')}", markup=False, soft_wrap=True)
    print_skipped(metrics)


def print_skipped(metrics: dict) -> None:
    if metrics["skipped"]:
        out.print(f"skipped {len(metrics['skipped'])} unusable file(s):")
        for item in metrics["skipped"]:
            out.print(f"  {item['path']}: {item['reason']}", markup=False)


@app.command()
def predict(
    run: Path = typer.Argument(..., help="Run folder written by `train` (or an exported .onnx or OpenVINO .xml file)."),
    inputs: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    format: Format = typer.Option(Format.table, "--format", help="table, json (JSON lines) or csv."),
    batch_size: int = typer.Option(64, min=1, help="Images per batch."),
    tta: bool = typer.Option(False, help="Test-time augmentation: average each image with its mirror."),
    engine: EngineName = typer.Option(EngineName.auto, help="auto: the run's fastest export that exists and matches "
                                                            "the run (model.xml with OpenVINO, then model.onnx with "
                                                            "ONNX Runtime), else PyTorch."),
    ood_keep: Optional[float] = typer.Option(None, "--ood-keep", help=OOD_KEEP_HELP),
    reject: bool = typer.Option(False, "--reject", help="Print unknown as the label of an image unlike the training "
                                                        "images (the JSON record's label too)."),
    coverage: Optional[float] = typer.Option(None, "--coverage", help="Add the conformal prediction set (\"set\"): "
                                             "classes that hold the true one for this fraction of images like the "
                                             "validation ones, e.g. 0.9 (single-label runs)."),
):
    """Classify images (calibrated probabilities; two classes use the run's threshold; multi-label:
    every class at or above its threshold), streaming one line per file; unreadable files get their
    own record with the reason. Each record also has "ood_score" (higher: more unlike the training
    images) and "unknown" (above the run's threshold). Exit status 1 when no file could be
    classified."""
    from .data.listing import expand_inputs
    from .predict.run import load_engine
    from .utils.progress import Reporter

    from .predict.run import is_anomaly_run

    if is_anomaly_run(run):
        from .predict.anomaly_engine import load_detector

        predict_anomaly(load_detector(run), inputs, format, batch_size, tta)
        return
    classifier = load_engine(run, engine.value, log=lambda m: typer.echo(m, err=True))
    classifier.configure(ood_keep, coverage)
    if reject and not classifier.has_ood:
        fail(classifier.before_open_world("--reject"))
    if reject and "unknown" in classifier.classes:
        fail(f"--reject prints 'unknown' as the label, but {run} has a class named unknown; read the records' "
             "\"unknown\" field instead")
    if not classifier.has_ood:
        typer.echo(f"note: {classifier.origin} was trained before OOD scores: records have no ood_score or unknown "
                   "(train it again to get them)", err=True)
    paths, stdout, reporter = expand_inputs(inputs), sys.stdout, Reporter()
    if reporter.live:  # a bar needs the total: list the files first (names only)
        paths = list(paths)
        reporter.start("predict", len(paths))
    # The bar redirects sys.stdout to the terminal; records piped to a file must not follow it.
    stream = sys.stdout if stdout.isatty() else stdout
    writer = csv.writer(stream)
    key = "labels" if classifier.multilabel else "label"
    extra = (["ood_score", "unknown"] if classifier.has_ood else []) + (["set"] if coverage is not None else [])
    if format is Format.csv:
        writer.writerow(["path", key, *[f"p_{c}" for c in classifier.classes], *extra, "error"])
    failures = total = 0
    try:
        for record in classifier.predict_files(paths, batch_size, tta=tta):
            reporter.advance()
            total += 1
            error = record.get("error")
            failures += error is not None
            probs = record.get("probabilities", {})
            if reject and record.get("unknown"):
                record[key] = ["unknown"] if classifier.multilabel else "unknown"
            decided = record.get(key, "")
            if isinstance(decided, list):  # multi-label: the CSV cell as train reads it
                decided = classifier.label_sep.join(decided)
            if format is Format.json:
                line = json.dumps(record)
            elif format is Format.csv:
                cells = {"ood_score": f"{record['ood_score']:.6f}" if "ood_score" in record else "",
                         "unknown": str(record["unknown"]).lower() if "unknown" in record else "",
                         "set": classifier.label_sep.join(record["set"]) if "set" in record else ""}
                writer.writerow([record["path"], decided, *[f"{probs[c]:.6f}" if probs else "" for c in classifier.classes],
                                 *[cells[name] for name in extra], error or ""])
                stream.flush()
                continue
            elif error:
                line = f"{record['path']}\tERROR: {error}"
            else:
                line = f"{record['path']}\t{decided or '(no label)'}\t" + "  ".join(
                    f"{c}={p:.4f}" for c, p in probs.items())
                if "ood_score" in record:
                    line += f"\tood {record['ood_score']:.4f}" + (" UNKNOWN (unlike the training images)"
                                                                   if record["unknown"] else "")
                if "set" in record:
                    line += f"\tset {{{', '.join(record['set'])}}}"
            typer.echo(line, file=stream)
    finally:
        reporter.stop()
    predicted(failures, total, inputs, "classified")


def predicted(failures: int, total: int, inputs: list[Path], verb: str) -> None:
    """`predict`'s end: the count of failed files; exit 2 without any file, 1 when none succeeded."""
    if failures:
        typer.echo(f"{failures} of {total} file(s) could not be {verb} (see their records)", err=True)
    if total == 0:
        fail(f"no image files in {', '.join(map(str, inputs))}")
    if failures == total:
        raise typer.Exit(1)


def predict_anomaly(detector, inputs: list[Path], format: Format, batch_size: int, tta: bool) -> None:
    """`predict` on an anomaly run: one record per file (anomaly_score, label, threshold)."""
    from .data.listing import expand_inputs

    writer = csv.writer(sys.stdout)
    if format is Format.csv:
        writer.writerow(["path", "label", "anomaly_score", "threshold", "error"])
    failures = total = 0
    for record in detector.predict_files(expand_inputs(inputs), batch_size, tta=tta):
        total += 1
        error = record.get("error")
        failures += error is not None
        if format is Format.json:
            typer.echo(json.dumps(record))
        elif format is Format.csv:
            writer.writerow([record["path"], record.get("label", ""), f"{record['anomaly_score']:.6f}" if not error
                             else "", f"{detector.threshold:.6f}", error or ""])
            sys.stdout.flush()
        elif error:
            typer.echo(f"{record['path']}\tERROR: {error}")
        else:
            typer.echo(f"{record['path']}\t{record['label']}\tanomaly_score={record['anomaly_score']:.4f}"
                       f"  threshold={record['threshold']:.4f}")
    predicted(failures, total, inputs, "scored")


@app.command()
def explain(
    run: Path = typer.Argument(..., help="Run folder written by `train`."),
    inputs: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the heatmap overlays (PNG)."),
    label: Optional[str] = typer.Option(None, "--label", help="Explain this class (default: the predicted one; "
                                                              "multi-label: each predicted class)."),
):
    """Grad-CAM heatmaps: where each image holds the evidence for its predicted class (multi-label:
    one overlay per predicted class)."""
    from .data.listing import expand_inputs
    from .predict.run import is_anomaly_run, load
    from .reports.explain import explain_files

    if is_anomaly_run(run):
        from .predict.anomaly_engine import load_detector
        from .reports.anomaly import explain_anomaly

        if label is not None:
            fail("--label is for classifiers; an anomaly run's map shows where each image is unusual")
        failures = 0
        for record in explain_anomaly(load_detector(run), expand_inputs(inputs), out_dir):
            failures += "error" in record
            typer.echo(f"{record['path']}\tERROR: {record['error']}" if "error" in record else
                       f"{record['path']}\t{record['label']}\t{record['anomaly_score']:.4f}\t{record['output']}")
        if failures:
            typer.echo(f"{failures} file(s) could not be explained (see their records)", err=True)
        return
    classifier = load(run)
    failures = 0
    for record in explain_files(classifier, expand_inputs(inputs), out_dir, label=label):
        if "error" in record:
            failures += 1
            typer.echo(f"{record['path']}\tERROR: {record['error']}")
        else:
            typer.echo(f"{record['path']}\t{record['label']}\t{record['probability']:.4f}\t{record['output']}")
    if failures:
        typer.echo(f"{failures} file(s) could not be explained (see their records)", err=True)


@app.command()
def report(
    run: Path = typer.Argument(..., help="Run folder written by `train`."),
    data: Optional[Path] = typer.Argument(None, help="Labelled test folder/CSV (default: the run's validation set)."),
    output: Optional[Path] = typer.Option(None, "--output", help="Where to write (default RUN/report.html)."),
    tta: bool = typer.Option(False, help="Test-time augmentation: average each image with its mirror."),
    ood_dir: Optional[Path] = typer.Option(None, "--ood-dir", help="Classifier runs: images unlike the training ones "
                                           "(any folder): their OOD scores beside the others, AUROC and FPR at 95 % "
                                           "TPR against DATA (as evaluate --ood-dir), the most unusual of them."),
    normal_class: Optional[str] = typer.Option(None, "--normal-class", help="Anomaly runs: the class folder of normal "
                                               "images in DATA (default: the run's); every other class is anomalous."),
):
    """A self-contained HTML report of a run (opens from disk, loads nothing from the network). A
    classifier's: metrics, curves, mistakes and its OOD scores; an anomaly run's (DATA needed): the
    metrics evaluate gives, score histograms and the most anomalous images with their maps."""
    from .reports.report import report as write

    typer.echo(f"Wrote {write(run, data, tta=tta, output=output, ood_dir=ood_dir, normal_class=normal_class)}")


@app.command()
def export(
    run: Path = typer.Argument(..., help="Run folder written by `train`."),
    format: str = typer.Option("onnx", "--format", help="onnx, openvino (IR: .xml + .bin), web (an offline "
                                                        "browser app: a folder), or torch (a torch.export .pt2 program)."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="File (web: folder) to write (default: RUN/model.onnx, "
                                                                "RUN/model.xml, RUN/web or RUN/model.pt2)."),
    quantize: Optional[str] = typer.Option(None, help="int8 (static, calibrated on --val-dir) or int8-dynamic."),
    val_dir: Optional[Path] = typer.Option(None, help="Labelled folder/CSV: checks (and calibrates) a quantized model."),
    tolerance: float = typer.Option(1.0, help="Largest validation accuracy drop (points) a quantized model may have."),
    force: bool = typer.Option(False, help="Write the quantized model even if it fails the accuracy check."),
    layout: str = typer.Option("nhwc", help="Input layout of the exported graph: nhwc or nchw (uint8 RGB)."),
):
    """Export for deployment: preprocessing inside, probabilities out, metadata in the file."""
    from .predict.run import is_anomaly_run

    if is_anomaly_run(run):  # the bank inside; scores and maps out (deploy/anomaly_export.py)
        from .deploy.anomaly_export import export_anomaly

        if format != "onnx":
            fail(f"an anomaly run exports to onnx only, not {format}")
        typer.echo(f"Wrote {export_anomaly(run, out_file, layout, quantize)['path']}", err=True)
        return
    from .deploy.export import export as export_run

    result = export_run(run, format, out_file, quantize, val_dir, tolerance, force, layout)
    if "drop" in result:
        typer.echo(f"validation accuracy: float {result['float_accuracy']:.2%}, {quantize} "
                   f"{result['quantized_accuracy']:.2%} (drop {result['drop'] * 100:.2f} points)", err=True)
    typer.echo(f"Wrote {result['path']}", err=True)


@app.command()
def serve(
    run: Path = typer.Argument(..., help="Run folder written by `train` (or an exported .onnx or OpenVINO .xml file)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(8000, min=1, max=65535),
    engine: EngineName = typer.Option(EngineName.auto, help="As for predict."),
    max_upload_mb: float = typer.Option(Limits.max_bytes / 2**20, min=0.001, help="Largest request body."),
    max_pixels: int = typer.Option(Limits.max_pixels, min=1, help="Largest image (width x height), checked before "
                                   "decoding."),
    timeout: float = typer.Option(Limits.timeout, min=0.001, help="Seconds a request may take (upload, decoding, "
                                  "prediction)."),
    ood_keep: Optional[float] = typer.Option(None, "--ood-keep", help=OOD_KEEP_HELP),
    coverage: Optional[float] = typer.Option(None, "--coverage", help="Add the conformal set (\"set\") at this "
                                             "coverage to every answer, as predict --coverage."),
):
    """HTTP service: POST /predict, GET /health, and a web page at /. Answers carry "ood_score"
    and "unknown" where the run has an OOD score. An anomaly run answers anomaly_score, label
    (anomaly or normal) and threshold, with its map over the image as a PNG."""
    import uvicorn

    from .apps.serve import create_app, header_timeout_protocol

    limits = Limits(max_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels, timeout=timeout)
    application = create_app(run, engine.value, limits, log=lambda m: typer.echo(m, err=True), ood_keep=ood_keep,
                             coverage=coverage)
    typer.echo(f"Serving {run} on http://{host}:{port}/ (Ctrl-C stops)", err=True)
    uvicorn.run(application, host=host, port=port, log_level="warning", timeout_keep_alive=5,
                http=header_timeout_protocol(timeout))


@app.command()
def label(
    pool: Path = typer.Argument(..., help="Folder of images to label (recursive)."),
    labels: Path = typer.Option(..., "--labels", help="CSV to write (path,label; paths relative to it): what "
                                                      "`train` reads. An existing one is resumed."),
    run: Optional[Path] = typer.Option(None, help="A trained run: its backbone gives the features, its model "
                                                  "the first predictions and classes, its OOD score the 'ood' order. "
                                                  "An anomaly run (--task anomaly): its anomaly score orders the "
                                                  "pool, the classes are its normal class and anomaly."),
    classes: Optional[str] = typer.Option(None, help="Class names, comma-separated (more can be added on the page)."),
    strategy: Optional[str] = typer.Option(None, help="Which image next: uncertainty, diversity, random, ood (the "
                                                      "run's OOD score, most unusual first) or anomaly (an anomaly "
                                                      "run's score, most anomalous first). Default: anomaly with an "
                                                      "anomaly run, else uncertainty."),
    retrain_every: int = typer.Option(10, min=1, help="Retrain the head after this many new labels."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, help="Backbone for the features (without --run)."),
    image_size: Optional[int] = typer.Option(None, min=8, help="Input size; default: the weights' own."),
    cache_dir: Optional[str] = typer.Option(None, help="Feature store, as for train; default: ~/.cache/transferkit; "
                                                       "'': off."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(8000, min=1, max=65535),
):
    """Label a folder of images in the browser: the model picks the next image, retrains in
    seconds on cached features, and points at labels that look wrong. With --run, the pool can
    be ordered by the run's OOD score (--strategy ood), or by an anomaly run's score (good or
    defective: the most anomalous first)."""
    import uvicorn

    from .apps.label import Featurizer, LabelFile, Session, create_app
    from .apps.serve import header_timeout_protocol

    if run is not None and backbone != DEFAULT_BACKBONE:
        fail("--backbone and --run exclude each other (a run brings its own backbone)")
    names = [c.strip() for c in classes.split(",")] if classes else []
    labels_file = LabelFile(labels)  # a bad or busy CSV is refused before the backbone loads
    try:
        featurizer = Featurizer.build(run, backbone, None, image_size, cache_dir)
        session = Session(pool, labels_file, featurizer, names, strategy, retrain_every)
    except TransferkitError:
        labels_file.close()
        raise
    loopback = host in ("127.0.0.1", "localhost")
    application = create_app(session, ["127.0.0.1", "localhost"] if loopback else None,
                             log=lambda m: typer.echo(m, err=True))
    typer.echo(f"Labelling {len(session.files)} file(s) of {pool} into {labels} on http://{host}:{port}/ "
               "(Ctrl-C stops; every label is written at once)", err=True)
    uvicorn.run(application, host=host, port=port, log_level="warning", timeout_keep_alive=5,
                http=header_timeout_protocol(10.0))


class CheckFormat(str, Enum):
    table = "table"
    json = "json"


@app.command()
def check(
    data: Path = typer.Argument(..., help="Class folders or a CSV, as `train` reads them."),
    val_dir: Optional[Path] = typer.Option(None, help="Validation folder/CSV: leaks into it are reported."),
    test_dir: Optional[Path] = typer.Option(None, help="Test folder/CSV: leaks into it are reported."),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="Folder for check.html (thumbnails, no network) and "
                                                               "check.json (every finding)."),
    format: CheckFormat = typer.Option(CheckFormat.table, "--format", help="table (text) or json, on stdout."),
    phash_distance: Optional[int] = typer.Option(None, min=-1, max=64, help="Near-duplicate: perceptual hashes "
                                                 "within this many bits of 64 [default: 6; -1: off]."),
    cosine: Optional[float] = typer.Option(None, help="Near-duplicate: backbone features at least this cosine "
                                                      "similar [default: 0.9; above 1: off]."),
    min_match: Optional[float] = typer.Option(None, help="Near-duplicate: a proposed pair's aligned grey "
                                                         "thumbnails correlate at least this well [default: 0.95]."),
    features: bool = typer.Option(True, help="--no-features: no backbone (exact and hash near-duplicates, leaks, "
                                             "conflicts and the data's shape only; seconds)."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, help="Backbone for the features."),
    weights: Optional[str] = typer.Option(None, help="As for train."),
    image_size: Optional[int] = typer.Option(None, min=8, help="Input size; default: the weights' own."),
    cache_dir: Optional[str] = typer.Option(None, help="View store, shared with train and label; default: "
                                                       "~/.cache/transferkit; '': off."),
    task: str = typer.Option("auto", help="As for train: auto, multiclass or multilabel."),
    label_sep: str = typer.Option("|", help="As for train."),
    limit: int = typer.Option(10, min=1, help="Rows of each kind of finding in the table."),
    quiet: bool = typer.Option(False, help="No progress bar."),
):
    """Check the data before training: exact and near-duplicates, leakage across train/val/test
    (shown first), conflicting labels, outliers, likely label errors, class balance, sizes,
    modes, bit depths and unreadable files. Exit status 1 when leakage or conflicting labels are
    found, 0 otherwise, 2 for a user error."""
    from .curate.check import Thresholds, run_check, table, write_outputs
    from .utils.progress import Reporter

    given = {k: v for k, v in (("phash_distance", phash_distance), ("cosine", cosine),
                                          ("min_match", min_match)) if v is not None}
    report = run_check(data, val_dir, test_dir, task=task, label_sep=label_sep, backbone=backbone, weights=weights,
                       image_size=image_size, cache_dir=cache_dir, thresholds=Thresholds(**given),
                       embeddings=features, reporter=Reporter(quiet=quiet))
    if out_dir is not None:
        written = write_outputs(report, out_dir)
        typer.echo(f"Wrote {written[1]} and {written[0]}", err=True)
    if format is CheckFormat.json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        typer.echo(table(report, limit))
    raise typer.Exit(report.exit_code)


@app.command()
def backbones():
    """Backbones whose weights are available right now without a network, and from where."""
    from .models.sources import available_backbones

    table = Table()
    for column in ("backbone", "weights", "status"):
        table.add_column(column)
    for row in available_backbones():
        table.add_row(row["backbone"], row["weights"], row["status"])
    out.print(table)
    out.print("Any other timm model name works with --weights FILE, or online through timm's "
              "download, or with --weights random.")


@app.command()
def layers(
    backbone: str = typer.Argument(DEFAULT_BACKBONE, help="A timm model name."),
    weights: Optional[str] = typer.Option(None, help="As for train; 'random' needs no weights."),
):
    """The base model's layers with the indices that --fine-tune-at counts."""
    from .models.backbones import create_backbone

    made = create_backbone(backbone, weights or "random")
    default = made.default_fine_tune_at
    out.print(f"Number of layers in the base model: {len(made.layers)}")
    for i, (name, module) in enumerate(made.layers):
        params = sum(p.numel() for p in module.parameters(recurse=False))
        mark = "  <- default fine_tune_at" if name == default else ""
        out.print(f"{i:>4}  {name:<40} {type(module).__name__:<18} {params:>10,}{mark}", markup=False)


@app.command("import-keras")
def import_keras(
    file: Path = typer.Argument(..., help="Keras MobileNetV2 .h5: a keras-applications weights file or a saved model."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for backbone.safetensors + backbone.json."),
):
    """Convert a Keras MobileNetV2 file to timm weights with Keras numerics (no TensorFlow needed)."""
    from .models.keras import import_file

    config = import_file(file, out_dir)
    head = f"; its head ({', '.join(config['head_not_imported'])}) is not imported" if config["head_not_imported"] else ""
    typer.echo(f"Wrote {out_dir}/backbone.safetensors and backbone.json: {config['backbone']} "
               f"({config['keras_model'] or 'bare MobileNetV2'}, {config['preprocess']['image_size']} px){head}. "
               f"Train with --backbone {config['backbone']} --weights {out_dir}")


def main() -> None:
    try:
        app()
    finally:
        # Leave the millions of objects that importing torch, timm and scikit-learn made to the
        # operating system: Python's last garbage collection would walk them all for about 1 s on
        # its way out (measured in docs/benchmarks.md, "Fixed costs of a short run").
        gc.freeze()


if __name__ == "__main__":
    main()
