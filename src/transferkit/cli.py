"""The `transferkit` command: a thin layer over the Python API."""

from __future__ import annotations

import csv
import json
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .backbones import BackboneError, DEFAULT_BACKBONE, available_backbones, create_backbone
from .data import DataError
from .engines import load_engine
from .predict import RunError, expand_inputs, load
from .progress import Reporter
from .train import TrainConfig, train as train_run

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train, evaluate and use image classifiers by transfer learning, on a CPU.")
out = Console()
USER_ERRORS = (DataError, BackboneError, RunError, ValueError, OSError)
D = TrainConfig()  # the CLI's defaults are the library's


def fail(exc: Exception) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(2)


class Format(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"


class Balance(str, Enum):
    balanced = "balanced"
    none = "none"


class ThresholdMetric(str, Enum):
    none = "none"
    balanced_accuracy = "balanced_accuracy"
    f1 = "f1"
    youden = "youden"


class Monitor(str, Enum):
    val_loss = "val_loss"
    val_accuracy = "val_accuracy"


@app.command()
def train(
    data: Path = typer.Argument(..., help="Class folders (one per class) or a CSV of path,label."),
    out_dir: Path = typer.Option(..., "--out", help="Run directory to write."),
    backbone: str = typer.Option(DEFAULT_BACKBONE, help="Any timm model name."),
    weights: Optional[str] = typer.Option(None, help="Weights file (.safetensors/.pth), or 'random'."),
    val_dir: Optional[Path] = typer.Option(None, help="Separate validation folder/CSV (else a split)."),
    image_size: Optional[int] = typer.Option(None, help="Input size in pixels (default: the weights')."),
    epochs: int = typer.Option(D.epochs, help="Phase 1 epochs (head only)."),
    fine_tune_epochs: int = typer.Option(D.fine_tune_epochs, help="Phase 2 epochs (fine-tuning)."),
    fine_tune_at: Optional[str] = typer.Option(None, help="First unfrozen layer: index or name."),
    lr: float = typer.Option(D.lr, help="Base learning rate (phase 2 uses 0.1 x)."),
    batch_size: int = typer.Option(D.batch_size),
    val_split: float = typer.Option(D.val_split, help="Validation fraction when no --val-dir."),
    seed: int = typer.Option(D.seed),
    dropout: float = typer.Option(D.dropout),
    flip: bool = typer.Option(D.flip, help="Random horizontal flip in training."),
    rotation: float = typer.Option(D.rotation, help="Random rotation, fraction of a full turn (0 = off; the seed: 0.2)."),
    train_bn: bool = typer.Option(False, help="Let unfrozen BatchNorm layers update their statistics."),
    monitor: Monitor = typer.Option(Monitor.val_loss, help="Which validation number picks the kept epoch."),
    threshold_metric: ThresholdMetric = typer.Option(D.threshold_metric, help="Two classes: choose the threshold on validation to maximise this (none: use --threshold)."),
    threshold: float = typer.Option(D.threshold, help="Two classes: the fixed threshold on p(class 1)."),
    class_weight: Balance = typer.Option(D.class_weight, help="Loss weights per class: balanced = n / (C * n_c)."),
    sampler: Balance = typer.Option(D.sampler, help="balanced: every class drawn equally often per epoch."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1 ..."),
    cache: bool = typer.Option(True, help="Train from cached frozen-layer outputs (--no-cache: the plain loop)."),
    views: int = typer.Option(D.views, help="Augmented views cached per image, besides the clean one."),
    cache_memory_gb: Optional[float] = typer.Option(None, help="RAM for the cache before it spills to disk."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bfloat16 autocast while extracting cached activations (default: where the hardware supports it)."),
    cache_dir: Optional[str] = typer.Option(None, help="Views kept for later runs (default ~/.cache/transferkit; '' = off)."),
    cache_cap_gb: float = typer.Option(D.cache_cap_gb, help="Size cap of --cache-dir; oldest files go first."),
    keep_cache: bool = typer.Option(False, help="Keep arrays spilled to RUN/cache/ after training."),
    quiet: bool = typer.Option(False, help="Only errors."),
):
    """Train a classifier: frozen backbone + new head, then fine-tune from --fine-tune-at."""
    try:
        config = TrainConfig(
            backbone=backbone, weights=weights, image_size=image_size, epochs=epochs,
            fine_tune_epochs=fine_tune_epochs, fine_tune_at=fine_tune_at, lr=lr,
            batch_size=batch_size, val_split=val_split, seed=seed, dropout=dropout, flip=flip,
            rotation=rotation, train_bn=train_bn, monitor=monitor.value, class_weight=class_weight.value,
            threshold_metric=threshold_metric.value, threshold=threshold,
            sampler=sampler.value, device=device,
            cache=cache, views=views, cache_memory_gb=cache_memory_gb, bf16=bf16,
            cache_dir=cache_dir, cache_cap_gb=cache_cap_gb, keep_cache=keep_cache)
        train_run(data, out_dir, config, val_data=val_dir, reporter=Reporter(quiet=quiet))
    except USER_ERRORS as exc:
        fail(exc)
    if not quiet:
        typer.echo(f"Wrote {out_dir}/ (model.safetensors, model.json, metrics.json, history.csv, "
                   "learning_curves.png, skipped.txt, val_predictions.csv, report.html)", err=True)


@app.command()
def evaluate(
    run: Path = typer.Argument(..., help="Run directory written by `train`."),
    data: Path = typer.Argument(..., help="Labelled class folders or CSV."),
    output: Optional[Path] = typer.Option(None, "--output", help="Also write the metrics as JSON."),
    tta: bool = typer.Option(False, help="Test-time augmentation: average each image with its mirror."),
):
    """Metrics of a trained model on another labelled folder."""
    try:
        metrics = load(run).evaluate(data, tta=tta)
    except USER_ERRORS as exc:
        fail(exc)
    if output:
        output.write_text(json.dumps(metrics, indent=2) + "\n")
    low, high = metrics["accuracy_ci95"]
    out.print(f"{data}: {metrics['n']} images{' (TTA)' if tta else ''}, accuracy {metrics['accuracy']:.4f} "
              f"(95% CI {low:.4f}-{high:.4f}), balanced accuracy {metrics['balanced_accuracy']:.4f}, "
              f"loss {metrics['loss']:.4f}, ECE {metrics['ece']:.4f}", markup=False, soft_wrap=True)
    if "roc_auc" in metrics and metrics["roc_auc"] is not None:
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
    if metrics["skipped"]:
        out.print(f"skipped {len(metrics['skipped'])} unusable file(s):")
        for item in metrics["skipped"]:
            out.print(f"  {item['path']}: {item['reason']}", markup=False)


class Engine(str, Enum):
    auto = "auto"
    torch = "torch"
    onnx = "onnx"


@app.command()
def predict(
    run: Path = typer.Argument(..., help="Run directory written by `train` (or an exported .onnx file)."),
    inputs: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    format: Format = typer.Option(Format.table, "--format", help="table, json (JSON lines) or csv."),
    batch_size: int = typer.Option(64),
    tta: bool = typer.Option(False, help="Test-time augmentation: average each image with its mirror."),
    engine: Engine = typer.Option(Engine.auto, help="auto: the run's model.onnx with ONNX Runtime when it exists, else PyTorch."),
):
    """Classify images (calibrated probabilities; two classes use the run's threshold), streaming
    one line per file; unreadable files get their own record with the reason."""
    try:
        classifier = load_engine(run, engine.value, log=lambda m: typer.echo(m, err=True))
    except USER_ERRORS as exc:
        fail(exc)
    paths, stdout, reporter = expand_inputs(inputs), sys.stdout, Reporter()
    if reporter.live:  # a bar needs the total: list the files first (names only)
        paths = list(paths)
        reporter.start("predict", len(paths))
    # The bar redirects sys.stdout to the terminal; records piped to a file must not follow it.
    stream = sys.stdout if stdout.isatty() else stdout
    writer = csv.writer(stream)
    if format is Format.csv:
        writer.writerow(["path", "label", *[f"p_{c}" for c in classifier.classes], "error"])
    failures = 0
    for record in classifier.predict_files(paths, batch_size, tta=tta):
        reporter.advance()
        error = record.get("error")
        failures += error is not None
        probs = record.get("probabilities", {})
        if format is Format.json:
            line = json.dumps(record)
        elif format is Format.csv:
            writer.writerow([record["path"], record.get("label", ""),
                             *[f"{probs[c]:.6f}" if probs else "" for c in classifier.classes],
                             error or ""])
            stream.flush()
            continue
        elif error:
            line = f"{record['path']}\tERROR: {error}"
        else:
            line = f"{record['path']}\t{record['label']}\t" + "  ".join(
                f"{c}={p:.4f}" for c, p in probs.items())
        typer.echo(line, file=stream)
    reporter.stop()
    if failures:
        typer.echo(f"{failures} file(s) could not be classified (see their records)", err=True)


@app.command()
def explain(
    run: Path = typer.Argument(..., help="Run directory written by `train`."),
    inputs: list[Path] = typer.Argument(..., help="Image files and/or folders."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for the heatmap overlays (PNG)."),
):
    """Grad-CAM heatmaps: where each image holds the evidence for its predicted class."""
    from .explain import explain_files

    try:
        classifier = load(run)
        failures = 0
        for record in explain_files(classifier, expand_inputs(inputs), out_dir):
            if "error" in record:
                failures += 1
                typer.echo(f"{record['path']}\tERROR: {record['error']}")
            else:
                typer.echo(f"{record['path']}\t{record['label']}\t{record['probability']:.4f}\t{record['output']}")
    except USER_ERRORS as exc:
        fail(exc)
    if failures:
        typer.echo(f"{failures} file(s) could not be explained (see their records)", err=True)


@app.command()
def report(
    run: Path = typer.Argument(..., help="Run directory written by `train`."),
    data: Optional[Path] = typer.Argument(None, help="Labelled test folder/CSV (default: the run's validation set)."),
    output: Optional[Path] = typer.Option(None, "--output", help="Where to write (default RUN/report.html)."),
    tta: bool = typer.Option(False, help="Test-time augmentation: average each image with its mirror."),
):
    """A self-contained HTML report of a run (opens from disk, loads nothing from the network)."""
    from .report import report as write

    try:
        target = write(run, data, tta=tta, output=output)
    except USER_ERRORS as exc:
        fail(exc)
    typer.echo(f"Wrote {target}")


@app.command()
def export(
    run: Path = typer.Argument(..., help="Run directory written by `train`."),
    format: str = typer.Option("onnx", "--format", help="onnx, or torch (a torch.export .pt2 program)."),
    out_file: Optional[Path] = typer.Option(None, "--out", help="File to write (default: RUN/model.onnx or RUN/model.pt2)."),
    quantize: Optional[str] = typer.Option(None, help="int8 (static, calibrated on --val-dir) or int8-dynamic."),
    val_dir: Optional[Path] = typer.Option(None, help="Labelled folder/CSV: checks (and calibrates) a quantized model."),
    tolerance: float = typer.Option(1.0, help="Largest validation accuracy drop (points) a quantized model may have."),
    force: bool = typer.Option(False, help="Write the quantized model even if it fails the accuracy check."),
    layout: str = typer.Option("nhwc", help="Input layout of the exported graph: nhwc or nchw (uint8 RGB)."),
):
    """Export for deployment: preprocessing inside, probabilities out, metadata in the file."""
    from .export import export as export_run

    try:
        report = export_run(run, format, out_file, quantize, val_dir, tolerance, force, layout)
    except USER_ERRORS as exc:
        fail(exc)
    if "drop" in report:
        typer.echo(f"validation accuracy: float {report['float_accuracy']:.2f}%, {quantize} "
                   f"{report['quantized_accuracy']:.2f}% (drop {report['drop']:.2f} points)", err=True)
    typer.echo(f"Wrote {report['path']}", err=True)


@app.command()
def serve(
    run: Path = typer.Argument(..., help="Run directory written by `train` (or an exported .onnx file)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (default: this machine only)."),
    port: int = typer.Option(8000),
    engine: Engine = typer.Option(Engine.auto, help="As for predict."),
    max_upload_mb: float = typer.Option(10.0, help="Largest request body."),
    max_pixels: int = typer.Option(40_000_000, help="Largest image (width x height), checked before decoding."),
    timeout: float = typer.Option(10.0, help="Seconds a request may take (upload, decoding, prediction)."),
):
    """HTTP service: POST /predict, GET /health, and a web page at /."""
    import uvicorn

    from .serve import Limits, create_app

    try:
        limits = Limits(max_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels, timeout=timeout)
        application = create_app(run, engine.value, limits, log=lambda m: typer.echo(m, err=True))
    except USER_ERRORS as exc:
        fail(exc)
    typer.echo(f"Serving {run} on http://{host}:{port}/ (Ctrl-C stops)", err=True)
    uvicorn.run(application, host=host, port=port, log_level="warning")


@app.command()
def backbones():
    """Backbones whose weights are available right now without a network, and from where."""
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
    try:
        made = create_backbone(backbone, weights or "random")
    except USER_ERRORS as exc:
        fail(exc)
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
    from .keras import import_file

    try:
        config = import_file(file, out_dir)
    except USER_ERRORS as exc:
        fail(exc)
    head = f"; its head ({', '.join(config['head_not_imported'])}) is not imported" if config["head_not_imported"] else ""
    typer.echo(f"Wrote {out_dir}/backbone.safetensors and backbone.json: {config['backbone']} "
               f"({config['keras_model'] or 'bare MobileNetV2'}, {config['preprocess']['image_size']} px){head}. "
               f"Train with --backbone {config['backbone']} --weights {out_dir}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
