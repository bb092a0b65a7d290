"""One self-contained HTML page per run: data, settings, learning curves, metrics with their
interval, confusion matrix, ROC / precision-recall, the OOD scores (ood_section.py) and the most
confident mistakes with Grad-CAM; an anomaly run's page is anomaly_report.py's, in the same shell.
Every figure is a PNG embedded as base64: the page opens from disk and loads nothing."""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path
from string import Template

import numpy as np

from ..data.decode import load_image
from ..predict.classifier import Classifier
from ..predict.metrics import evaluation_metrics, predict_labels, predict_sets
from ..predict.run import is_anomaly_run, load, read_predictions
from ..utils.errors import ConfigError, ImageError, RunError, TransferkitError
from ..utils.files import write_text
from .check_section import check_section
from .ood_section import Scored, ood_section, score_folder
from .page import card, data_uri, figure_uri, gallery, page, settings_html, skipped_html, table

MISTAKES = 8  # most confident mistakes shown

PAGE = Template("""<section><h2>$eval_heading</h2>$cards<p class="note">$eval_note</p></section>
<section><h2>Data</h2><div class="two"><div>$counts</div><div>$skipped</div></div></section>
<section><h2>Training</h2><div class="two"><div>$settings</div><div>$model_facts</div></div></section>
<section><h2>Learning curves</h2><figure><img alt="learning curves" src="$learning_curves"></figure>
<p class="note">$curves_note</p></section>
<section><h2>$class_heading</h2><div class="two"><div>$per_class</div>
<figure><img alt="$class_figure_name" src="$class_figure"></figure></div></section>
$curves
$data_check
$open_world
<section><h2>Most confident mistakes</h2>$mistakes</section>
""")


def read_history(run_dir: Path) -> list[dict]:
    with open(run_dir / "history.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    return [{k: (int(v) if k in ("epoch", "phase") else float(v)) for k, v in r.items()} for r in rows]


def confident_mistakes(labels: np.ndarray, probs: np.ndarray, predicted: np.ndarray, k: int,
                       threshold: float = 0.5) -> np.ndarray:
    """Indices of the `k` most confident wrong predictions: the highest probability of the
    predicted class; for two classes, the longest way past the threshold towards certainty."""
    wrong = np.flatnonzero(predicted != labels)
    if probs.shape[1] == 2:
        p1 = probs[wrong, 1]
        confidence = np.where(predicted[wrong] == 1, (p1 - threshold) / max(1 - threshold, 1e-9),
                              (threshold - p1) / max(threshold, 1e-9))
    else:
        confidence = probs[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")[:k]]


def worst_label_sets(labels: np.ndarray, probs: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    """Multi-label: indices of the `k` images with a wrong label set and the highest summed binary
    cross-entropy over their classes."""
    wrong = np.flatnonzero((predicted != labels).any(1))
    p = np.clip(probs[wrong], 1e-7, 1 - 1e-7)
    loss = -(labels[wrong] * np.log(p) + (1 - labels[wrong]) * np.log(1 - p)).sum(1)
    return wrong[np.argsort(-loss, kind="stable")[:k]]


def readable(classifier: Classifier, paths: list[str], chosen: np.ndarray,
             images: np.ndarray | None) -> tuple[list[int], list[np.ndarray]]:
    """The chosen images that can still be read (from the decoded set, else from their files)."""
    found, arrays = [], []
    for i in chosen:
        try:
            arrays.append(images[i] if images is not None else load_image(paths[i], classifier.image_size,
                                                                                  rules=classifier.rules))
            found.append(i)
        except ImageError:
            continue  # the file moved since training: counted below the gallery
    return found, arrays


def label_mistakes_html(classifier: Classifier, paths: list[str], labels: np.ndarray, probs: np.ndarray,
                        predicted: np.ndarray, images: np.ndarray | None) -> str:
    """Multi-label: the worst images with their missed and extra labels, one Grad-CAM per predicted
    label (the most probable class when none is predicted)."""
    from .explain import explained_classes, gradcam, overlay_png

    chosen = worst_label_sets(labels, probs, predicted, MISTAKES)
    if len(chosen) == 0:
        return '<p>No mistakes on this set: every image got exactly its labels.</p>'
    found, arrays = readable(classifier, paths, chosen, images)
    figures, note = [], ("Grad-CAM: warm colours mark where the image holds the evidence for each predicted "
                         "class. Missed: true labels not predicted; extra: predicted labels not true.")
    names = classifier.classes
    for i, array, shown_classes in zip(found, arrays, explained_classes(classifier, probs[found], None)):
        try:
            pictures = [overlay_png(array, gradcam(classifier.model, array[None], np.array([c]),
                                                   device=classifier.device)[0][0]) for c in shown_classes]
        except TransferkitError as exc:  # not a CNN: the image without heatmaps
            pictures, note = [overlay_png(array, np.ones(array.shape[:2]), alpha=0)], str(exc)
        truth = [names[c] for c in np.flatnonzero(labels[i])]
        guess = [names[c] for c in np.flatnonzero(predicted[i])]
        missed = [n for n in truth if n not in guess]
        extra = [n for n in guess if n not in truth]
        scores = ", ".join(f"p({html.escape(names[c])}) = {probs[i, c]:.3f}" for c in shown_classes)
        for c, picture in zip(shown_classes, pictures):
            figures.append(
                f'<figure><img alt="Grad-CAM of {html.escape(Path(paths[i]).name)} for {html.escape(names[c])}" '
                f'src="{data_uri(picture)}"><figcaption>evidence for <b>{html.escape(names[c])}</b><br>'
                f'true {html.escape(", ".join(truth) or "(none)")}; predicted {html.escape(", ".join(guess) or "(none)")}'
                f'<br><b>missed</b> {html.escape(", ".join(missed) or "none")}, <b>extra</b> '
                f'{html.escape(", ".join(extra) or "none")} ({scores})'
                f'<br><span class="file">{html.escape(paths[i])}</span></figcaption></figure>')
    return gallery(figures, note if found else "", len(chosen) - len(found))


def mistakes_html(classifier: Classifier, paths: list[str], labels: np.ndarray, probs: np.ndarray,
                  predicted: np.ndarray, images: np.ndarray | None) -> str:
    from .explain import gradcam, overlay_png

    if classifier.multilabel:
        return label_mistakes_html(classifier, paths, labels, probs, predicted, images)
    chosen = confident_mistakes(labels, probs, predicted, MISTAKES, classifier.threshold)
    if len(chosen) == 0:
        return '<p>No mistakes on this set.</p>'
    found, arrays = readable(classifier, paths, chosen, images)
    figures, note = [], ""
    if found:
        try:
            cams, _, _ = gradcam(classifier.model, np.stack(arrays), target=predicted[found],
                                 device=classifier.device)
            pictures = [overlay_png(a, c) for a, c in zip(arrays, cams)]
            note = "Grad-CAM: warm colours mark where the image holds the evidence for the (wrong) predicted class."
        except TransferkitError as exc:  # not a CNN: show the images without heatmaps
            cams = np.ones((len(arrays), *arrays[0].shape[:2]))
            pictures, note = [overlay_png(a, c, alpha=0) for a, c in zip(arrays, cams)], str(exc)
        binary = len(classifier.classes) == 2
        for i, picture, cam in zip(found, pictures, cams):
            true, guess = classifier.classes[labels[i]], classifier.classes[predicted[i]]
            score = (f"p({html.escape(classifier.classes[1])}) = {probs[i, 1]:.3f}, threshold {classifier.threshold:.3f}"
                     if binary else f"p = {probs[i, predicted[i]]:.3f}")
            empty = "<br><i>no region supports this class</i>" if np.max(cam) <= 0 else ""
            figures.append(
                f'<figure><img alt="Grad-CAM of {html.escape(Path(paths[i]).name)}" src="{data_uri(picture)}">'
                f'<figcaption><b>true {html.escape(true)}</b>, predicted {html.escape(guess)} ({score}){empty}'
                f'<br><span class="file">{html.escape(paths[i])}</span></figcaption></figure>')
    return gallery(figures, note, len(chosen) - len(found))


def counts_html(metrics: dict, eval_counts: dict[str, int], eval_name: str, classes: list[str]) -> str:
    counts = dict(metrics.get("counts", {}))
    splits = [(name, counts[key]) for name, key in (("train", "train"), ("validation", "validation")) if key in counts]
    if eval_name != "validation":
        splits.append((eval_name, eval_counts))
    rows = [[c, *[s[1].get(c, 0) for s in splits]] for c in classes]
    rows.append(["total", *[sum(s[1].values()) for s in splits]])
    return table(["class", *[s[0] for s in splits]], rows)


def facts_html(meta: dict, classes: list[str]) -> str:
    fine = meta.get("fine_tune_at", {})
    selection = meta.get("threshold_selection") or {}
    rows = [["weights", meta.get("weights")],
            ["input size", meta["preprocess"]["image_size"]],
            ["fine-tuned from", f"layer {fine.get('index')} of {fine.get('num_layers')} ({fine.get('name')})"],
            ["kept epoch", meta.get("best_epoch")],
            ["training time", f"{meta.get('training_seconds', 0):.0f} s"],
            ["temperature", listed(meta.get("temperature", 1.0), classes, 3)]]
    for phase, stop in sorted(meta.get("early_stopping", {}).items()):
        rows.append([f"phase {phase} stopped early", f"after epoch {stop['epoch']}: {stop['reason']}"])
    for warning in meta.get("warnings", []):
        rows.append(["warning", warning])
    how = (f"chosen on validation for {selection.get('metric')}" if selection.get("metric") not in (None, "fixed")
           else "fixed")
    if meta.get("task") == "multilabel":
        rows.append(["thresholds", f"{listed(meta['threshold'], classes, 4)} ({how})"])
    elif len(classes) == 2:
        rows.append([f"threshold on p({classes[1]})", f"{float(meta.get('threshold', 0.5)):.4f} ({how})"])
    return "<h3>Model</h3>" + table(["", ""], rows, numeric_from=2)


def listed(value, classes: list[str], digits: int) -> str:
    """A number, or one per class (multi-label) as `class value` pairs."""
    if isinstance(value, list):
        return ", ".join(f"{c} {float(v):.{digits}f}" for c, v in zip(classes, value))
    return f"{float(value):.{digits}f}"


def label_cards(metrics: dict) -> list[str]:
    """Multi-label headline numbers."""
    low, high = metrics["accuracy_ci95"]
    return [card("mean average precision", f"{metrics['map']:.3f}", "macro, over the classes"),
            card("micro-F1", f"{metrics['f1_micro']:.3f}", "every (image, class) decision"),
            card("macro-F1", f"{metrics['f1_macro']:.3f}", "mean of the classes' F1"),
            card("subset accuracy", f"{metrics['accuracy']:.1%}", f"every label right; 95% CI {low:.1%} – {high:.1%}"),
            card("Hamming loss", f"{metrics['hamming_loss']:.3f}", "share of wrong (image, class) decisions"),
            card("labels per image", f"{metrics['label_cardinality']['predicted']:.2f}",
                 f"predicted; true {metrics['label_cardinality']['true']:.2f}"),
            card("log loss", f"{metrics['loss']:.3f}", "binary, per class"), card("ECE", f"{metrics['ece']:.3f}")]


def single_label_cards(metrics: dict, classes: list[str]) -> list[str]:
    low, high = metrics["accuracy_ci95"]
    cards = [card("accuracy", f"{metrics['accuracy']:.1%}", f"95% CI {low:.1%} – {high:.1%}"),
             card("balanced accuracy", f"{metrics['balanced_accuracy']:.1%}", "mean recall of the classes")]
    if len(classes) == 2 and metrics.get("roc_auc") is not None:
        cards += [card("ROC-AUC", f"{metrics['roc_auc']:.3f}", f"positive: {classes[1]}"),
                  card("average precision", f"{metrics['average_precision']:.3f}", f"positive: {classes[1]}")]
    for k, value in metrics.get("top_k_accuracy", {}).items():
        cards.append(card(f"top-{k} accuracy", f"{value:.1%}"))
    return cards + [card("log loss", f"{metrics['loss']:.3f}"), card("ECE", f"{metrics['ece']:.3f}", "calibration error")]


def write_report(run_dir: str | Path, classifier: Classifier, eval_name: str, paths: list[str],
                 labels: np.ndarray, probs: np.ndarray, images: np.ndarray | None = None,
                 eval_skipped: list[tuple[str, str]] = (), tta: bool = False,
                 output: str | Path | None = None, scored: list | None = None) -> Path:
    """Write the page for these predictions (`eval_name`: "validation" or the test set's name);
    `scored`: the sets whose OOD scores the page shows beside the validation images' (ood_section.Scored:
    the test set, an --ood-dir folder)."""
    from .plots import binary_curves, confusion_figure, label_pr_curves, learning_curves

    run_dir = Path(run_dir)
    meta, classes = classifier.meta, classifier.classes
    train_metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    metrics = evaluation_metrics(labels, probs, classes, classifier.threshold)
    multilabel = classifier.multilabel
    predicted = predict_sets(probs, classifier.threshold) if multilabel else predict_labels(probs, classifier.threshold)
    n = metrics["n"]
    cards = label_cards(metrics) if multilabel else single_label_cards(metrics, classes)
    optimistic = (" These are validation images: they chose the kept epoch, the temperature and the threshold, "
                  "so the numbers are optimistic; run <code>transferkit report RUN TEST_DIR</code> for a held-out set."
                  if eval_name == "validation" else "")
    eval_note = (f"{n} images; one image is worth {1 / max(n, 1):.2%} of {'subset ' if multilabel else ''}accuracy. "
                 f"The interval is the 95% Wilson score interval of the accuracy." + (" Test-time augmentation: each image averaged with its mirror."
                                                      if tta else "") + optimistic)
    history = read_history(run_dir)
    epochs = int(meta.get("config", {}).get("epochs", 0))
    fine_start = epochs + 0.5 if any(r["phase"] == 2 for r in history) else None
    averages = [[f"{a} average", f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", "", n]
                for a, m in metrics["averages"].items()]
    if multilabel:
        per_class = table(["class", "precision", "recall", "F1", "AP", "support"],
                          [[c, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}",
                            "n/a" if m["average_precision"] is None else f"{m['average_precision']:.3f}", m["support"]]
                           for c, m in metrics["per_class"].items()] + averages)
        class_figure = figure_uri(lambda f: label_pr_curves(np.asarray(labels), np.asarray(probs), classes,
                                                            list(metrics["thresholds"].values()), f))
    else:
        per_class = table(["class", "precision", "recall", "F1", "support"],
                          [[c, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1']:.3f}", m["support"]]
                           for c, m in metrics["per_class"].items()] + [r[:4] + r[5:] for r in averages])
        class_figure = figure_uri(lambda f: confusion_figure(metrics["confusion_matrix"]["rows_true_cols_predicted"],
                                                             classes, f))
    eval_counts = ({c: int(v) for c, v in zip(classes, np.asarray(labels).sum(0))} if multilabel else
                   {c: int((np.asarray(labels) == i).sum()) for i, c in enumerate(classes)})
    curves = ""
    if not multilabel and len(classes) == 2 and metrics.get("roc_auc") is not None:
        uri = figure_uri(lambda f: binary_curves(np.asarray(labels), np.asarray(probs)[:, 1], classifier.threshold,
                                                 classes[1], f))
        curves = (f'<section><h2>ROC, precision-recall and calibration</h2><figure><img alt="ROC and '
                  f'precision-recall curves" src="{uri}"></figure><p class="note">The red dot is the operating '
                  f'threshold {classifier.threshold:.3f} on p({html.escape(classes[1])}).</p></section>')
    body = PAGE.substitute(
        eval_heading=html.escape(f"Results on {eval_name}"), cards=f'<div class="cards">{"".join(cards)}</div>',
        eval_note=eval_note,
        counts="<h3>Images per class and split</h3>" + counts_html(train_metrics, eval_counts, eval_name, classes)
        + ('<p class="note">Multi-label: an image counts once for each of its classes.</p>' if multilabel else ""),
        skipped=skipped_html(run_dir, list(eval_skipped)),
        settings=settings_html(meta), model_facts=facts_html(meta, classes),
        learning_curves=data_uri((run_dir / "learning_curves.png").read_bytes())  # drawn once, when the run was saved
        if (run_dir / "learning_curves.png").is_file() else figure_uri(lambda f: learning_curves(history, f, fine_tune_start=fine_start)),
        curves_note=("The dashed line marks the start of fine-tuning (phase 2); the kept epoch is "
                     f"{meta.get('best_epoch')}."),
        class_heading="Per-class metrics and precision-recall" if multilabel else
        "Per-class metrics and confusion matrix",
        per_class=per_class, class_figure=class_figure,
        class_figure_name="precision-recall per class" if multilabel else "confusion matrix",
        curves=curves, data_check=check_section(run_dir), open_world=ood_section(classifier, scored or []),
        mistakes=mistakes_html(classifier, list(paths), np.asarray(labels), np.asarray(probs), predicted, images))
    target = Path(output) if output else run_dir / "report.html"
    write_text(target, page(run_dir.resolve().name, f"{meta['backbone']} · {len(classes)} classes: {', '.join(classes)}",
                            body, meta))
    return target


def report(run_dir: str | Path, data: str | Path | None = None, tta: bool = False, batch_size: int = 64,
           output: str | Path | None = None, ood_dir: str | Path | None = None,
           normal_class: str | None = None) -> Path:
    """The page for a run: on a labelled folder/CSV when given, else on the run's validation
    predictions (val_predictions.csv); with `ood_dir` (a classifier with an OOD score), that
    folder's scores beside the others. An anomaly run's page needs `data` (anomaly_report.py)."""
    run_dir = Path(run_dir)
    if is_anomaly_run(run_dir):
        if ood_dir is not None:
            raise ConfigError(f"{run_dir}: --ood-dir is for classifier runs; an anomaly run's report shows its "
                              "anomaly scores on the test folder (its normal class against the others)")
        from .anomaly_report import anomaly_report

        return anomaly_report(run_dir, data, normal_class, tta=tta, output=output)
    if normal_class is not None:
        raise ConfigError(f"{run_dir}: a classifier run, not an anomaly run; --normal-class is for runs trained "
                          "with --task anomaly")
    classifier = load(run_dir)
    if ood_dir is not None:  # before any image is decoded, as evaluate --ood-dir
        if not classifier.has_ood:
            raise RunError(classifier.before_open_world("--ood-dir"))
        if not Path(ood_dir).is_dir():
            raise ConfigError(f"{ood_dir}: no such folder (--ood-dir)")
    saved = run_dir / "val_predictions.csv"
    if data is None and not saved.is_file():
        raise RunError(f"{saved}: not found; give a labelled folder: transferkit report {run_dir} DATA_DIR")
    scored = []
    if data is not None:
        decoded = classifier.read_labelled(data)
        answer = classifier.predict_open(decoded.images, batch_size, tta)
        probs = answer["probabilities"]
        if "ood_score" in answer:
            scored.append(Scored.of_labelled(classifier, f"test set {data}", decoded, answer))
    if ood_dir is not None:
        scored.append(score_folder(classifier, ood_dir, batch_size, tta))
    if data is not None:
        return write_report(run_dir, classifier, f"test set {data}", decoded.paths, decoded.labels, probs,
                            decoded.images, decoded.skipped, tta, output, scored)
    paths, labels, probs = read_predictions(saved, classifier.classes, classifier.label_sep)
    return write_report(run_dir, classifier, "validation", paths, labels, probs, output=output, scored=scored)
