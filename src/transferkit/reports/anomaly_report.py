"""The report of an anomaly run (`train --task anomaly`) on a labelled test folder, one
self-contained page in the classifier report's shell: the metrics `evaluate` gives (AUROC, average
precision, F1, false-alarm and miss rates with their intervals: `anomaly_metrics`), histograms of
the scores of the held-out good images, the normal and the anomalous test images against the
threshold, the most anomalous images and the worst mistakes both ways (false alarms, misses) with
their maps (reports/anomaly.py's colouring)."""

from __future__ import annotations

import csv
import html
from pathlib import Path

import numpy as np

from ..predict.anomaly_engine import anomaly_metrics, load_detector
from ..utils.errors import RunError
from ..utils.files import write_text
from .anomaly import heat
from .explain import overlay_png
from .plots import score_histograms
from .page import card, data_uri, figure_uri, gallery, page, settings_html, skipped_html, table

MOST = 12  # the most anomalous images shown
MISTAKES = 8  # false alarms and misses shown, each


def anomaly_report(run_dir: str | Path, data: str | Path | None, normal_class: str | None = None,
                   batch_size: int = 16, tta: bool = False, output: str | Path | None = None) -> Path:
    """Write the page (default RUN/report.html) for an anomaly run on the labelled folder or CSV
    `data`: `normal_class` (default: the run's) is normal, every other class anomalous."""
    run_dir = Path(run_dir)
    if data is None:
        raise RunError(f"{run_dir}: an anomaly run (--task anomaly), not a classifier: it has no validation "
                       f"predictions to report; give a labelled test folder with its normal class and at least one "
                       f"other: transferkit report {run_dir} TEST_DIR [--normal-class NAME]")
    if tta:
        raise RunError("--tta is for classifiers; an anomaly run scores each image as it is")
    detector = load_detector(run_dir)
    test, y, normal = detector.read_test(data, normal_class)  # what evaluate reads, with its checks
    scores, _ = detector.score(test.images, batch_size)
    metrics = anomaly_metrics(y, scores, detector.threshold)  # what evaluate computes of these scores
    held = held_out_scores(run_dir)
    body = (results_html(metrics, data, normal, detector)
            + scores_html(test, y, scores, held, detector)
            + galleries_html(detector, test, y, scores, batch_size)
            + f'<section><h2>Data</h2><div class="two"><div>{counts_html(detector.meta, test, normal, scores, detector.threshold)}'
              f'</div><div>{skipped_html(run_dir, list(test.skipped))}</div></div></section>'
            + f'<section><h2>Training</h2><div class="two"><div>{settings_html(detector.meta)}</div>'
              f'<div>{facts_html(detector.meta)}</div></div></section>')
    meta = detector.meta
    target = Path(output) if output else run_dir / "report.html"
    write_text(target, page(run_dir.resolve().name, f"{meta['backbone']} · anomaly detection · normal class: "
                            f"{meta.get('normal_class')}", body, meta))
    return target


def held_out_scores(run_dir: Path) -> np.ndarray | None:
    """The held-out good images' scores (val_scores.csv: they fitted the threshold), or None where
    the file is missing or unreadable (the page says so)."""
    try:
        with open(run_dir / "val_scores.csv", newline="", encoding="utf-8") as fh:
            found = np.array([float(r["anomaly_score"]) for r in csv.DictReader(fh)], dtype=np.float64)
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError):
        return None
    return found if len(found) and np.isfinite(found).all() else None


def interval(metrics: dict, key: str, percent: bool = False) -> str:
    low, high = metrics[f"{key}_ci95"]
    return f"95% CI {low:.1%} – {high:.1%}" if percent else f"95% CI {low:.3f} – {high:.3f}"


def results_html(metrics: dict, data, normal: str, detector) -> str:
    confusion = metrics["confusion"]
    cards = [card("AUROC", f"{metrics['auroc']:.3f}", interval(metrics, "auroc")),
             card("average precision", f"{metrics['average_precision']:.3f}", interval(metrics, "average_precision")),
             card("F1 at the threshold", f"{metrics['f1']:.3f}", interval(metrics, "f1")),
             card("best F1", f"{metrics['f1_best_threshold']:.3f}", "over all thresholds, for comparison"),
             card("false-alarm rate", f"{metrics['false_alarm_rate']:.1%}",
                  f"{confusion['normal_flagged']} of {metrics['n_normal']} normal; "
                  + interval(metrics, "false_alarm_rate", True)),
             card("miss rate", f"{metrics['miss_rate']:.1%}",
                  f"{confusion['true_anomaly_passed']} of {metrics['n_anomalous']} anomalous; "
                  + interval(metrics, "miss_rate", True))]
    note = (f"{metrics['n']} images: {metrics['n_normal']} normal (class {html.escape(normal)}), "
            f"{metrics['n_anomalous']} anomalous (every other class). An image is flagged as an anomaly when its "
            f"score is above the run's threshold {metrics['threshold']:.4f}: {html.escape(fitted(detector.meta))} "
            "The same numbers as <code>transferkit evaluate</code>. Intervals: stratified percentile bootstrap "
            "(AUROC, average precision, F1), Wilson (the rates).")
    table_html = table(["", "flagged as anomaly", "passed as normal"],
                       [["anomalous images", confusion["true_anomaly_flagged"], confusion["true_anomaly_passed"]],
                        ["normal images", confusion["normal_flagged"], confusion["normal_passed"]]])
    return (f'<section><h2>{html.escape(f"Results on test set {data}")}</h2><div class="cards">{"".join(cards)}</div>'
            f'<p class="note">{note}</p><h3>At the threshold</h3>{table_html}</section>')


def fitted(meta: dict) -> str:
    """How the run's threshold was fitted, from model.json: `--anomaly-threshold keep` (the default)
    or `f1` (labelled anomalies, recorded in threshold_method)."""
    section = meta["anomaly"]
    if section.get("threshold_rule", "keep") != "keep":
        return f"fitted at {section.get('threshold_method', section['threshold_rule'])}."
    keep = float(section["keep"])
    if not section.get("threshold_reached", True):
        return (f"the largest score of the {section.get('holdout_images')} held-out good images, too few for the rank "
                f"that keeps {keep:.0%} of them, so the false-alarm rate it promises is looser than {1 - keep:.0%}.")
    return f"fitted so that {keep:.0%} of good images pass it (split-conformal, on held-out good images)."


def scores_html(test, y: np.ndarray, scores: np.ndarray, held: np.ndarray | None, detector) -> str:
    threshold = detector.threshold
    groups = ([] if held is None else [("held-out good images (they fitted the threshold)", held)]) + [
        ("normal test images", scores[y == 0]), ("anomalous test images", scores[y == 1])]
    uri = figure_uri(lambda f: score_histograms([(f"{name} (n = {len(s)})", s) for name, s in groups], threshold,
                                                "anomaly score", f))
    rows = [[name, len(s), f"{int((s > threshold).sum())} ({np.mean(s > threshold):.1%})", f"{np.median(s):.4f}",
             f"{np.max(s):.4f}"] for name, s in groups]
    missing = ("" if held is not None else ' <span class="warn">val_scores.csv is missing or unreadable: the held-out '
               "good images' scores are not shown.</span>")
    return ('<section id="anomaly-scores"><h2>Anomaly scores</h2><figure><img alt="histogram of anomaly scores" '
            f'src="{uri}"></figure>' + table(["images", "n", "flagged as anomaly", "median score", "largest score"], rows)
            + '<p class="note">The score is the largest distance of an image\'s patch features to the good images\' '
              f'patch bank; the dashed line is the threshold. Each histogram counts the share of its own set.{missing}'
              '</p></section>')


def galleries_html(detector, test, y: np.ndarray, scores: np.ndarray, batch_size: int) -> str:
    """The most anomalous images, the false alarms with the highest scores and the misses with the
    lowest, each with its map; the maps of only these images are computed."""
    flagged = scores > detector.threshold
    most = np.argsort(-scores, kind="stable")[:MOST]
    alarms = np.flatnonzero((y == 0) & flagged)
    alarms = alarms[np.argsort(-scores[alarms], kind="stable")][:MISTAKES]
    misses = np.flatnonzero((y == 1) & ~flagged)
    misses = misses[np.argsort(scores[misses], kind="stable")][:MISTAKES]
    chosen = np.unique(np.r_[most, alarms, misses]).astype(int)
    _, maps = detector.score(test.images[chosen], batch_size, maps=True)
    pictures = {int(i): overlay_png(test.images[i], shown) for i, shown in zip(chosen, heat(detector, maps))}
    normal = detector.meta.get("normal_class")

    def figures(index: np.ndarray) -> list[str]:
        out = []
        for i in index:
            name = test.classes[test.labels[i]]
            verdict = "<b>anomaly</b>" if flagged[i] else "normal"
            out.append(f'<figure><img alt="anomaly map of {html.escape(Path(test.paths[i]).name)}" '
                       f'src="{data_uri(pictures[int(i)])}"><figcaption><b>anomaly_score {scores[i]:.4f}</b> '
                       f'(threshold {detector.threshold:.4f}): {verdict}<br>true class {html.escape(name)} '
                       f'({"anomalous" if y[i] else "normal"})<br><span class="file">{html.escape(test.paths[i])}'
                       '</span></figcaption></figure>')
        return out

    colours = ("Map colours: blue is a typical good patch (the median of the held-out good images' maps), red the "
               "threshold or above, the scale of the run and not of each image: a normal image stays blue (as "
               "<code>transferkit explain</code> draws them).")
    what = f"the normal class {html.escape(str(normal))}" if normal else "the normal images"
    return (f'<section id="most-anomalous"><h2>Most anomalous images</h2>'
            f'{gallery(figures(most), f"The {len(most)} highest scores of the test set, highest first. {colours}", 0)}'
            '</section><section id="false-alarms"><h2>False alarms: normal images flagged</h2>'
            + (gallery(figures(alarms), f"Images of {what} above the threshold, highest score first "
                                        f"({len(alarms)} of {int(((y == 0) & flagged).sum())}).", 0)
               if len(alarms) else "<p>None: no normal image of this set is above the threshold.</p>")
            + '</section><section id="misses"><h2>Misses: anomalous images passed</h2>'
            + (gallery(figures(misses), "Anomalous images at or below the threshold, lowest score first "
                                        f"({len(misses)} of {int(((y == 1) & ~flagged).sum())}).", 0)
               if len(misses) else "<p>None: every anomalous image of this set is above the threshold.</p>")
            + "</section>")


def counts_html(meta: dict, test, normal: str, scores: np.ndarray, threshold: float) -> str:
    section = meta["anomaly"]
    training = [["normal images in the patch bank", section.get("bank_images", "")],
                ["held-out normal images (the threshold)", section.get("holdout_images", "")],
                *[[f"left out of training: {c}", n] for c, n in (meta.get("left_out") or {}).items()]]
    rows = [[c, "normal" if c == normal else "anomalous", int((test.labels == i).sum()),
             int((scores[test.labels == i] > threshold).sum())] for i, c in enumerate(test.classes)]
    return ("<h3>Training images</h3>" + table(["", "images"], training)
            + "<h3>Test images per class</h3>" + table(["class", "role", "images", "flagged as anomaly"], rows, 2))


def facts_html(meta: dict) -> str:
    section = meta["anomaly"]
    rows = [["weights", meta.get("weights")], ["input size", meta["preprocess"]["image_size"]],
            ["layers", ", ".join(section.get("layers", []))],
            ["patch grid", f"{section.get('grid')} x {section.get('grid')} cells of {section.get('dims')} features"],
            ["patch bank", f"{section.get('bank_rows')} of {section.get('patches')} patches "
                           f"({section.get('bank_mib')} MiB, cap {section.get('cap_mib')} MiB)"],
            ["threshold", f"{float(meta['threshold']):.4f}: {fitted(meta)}"],
            ["training time", f"{meta.get('training_seconds', 0):.1f} s"]]
    return "<h3>Model</h3>" + table(["", ""], rows, numeric_from=2)
