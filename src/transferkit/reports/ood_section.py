"""The report's section on the OOD score of a classifier run: a histogram of the scores of the
validation images (from ood.safetensors), of the report's test images and of an `--ood-dir`
folder, with the threshold; the fraction of each set flagged `unknown`; with `--ood-dir`, AUROC
and FPR at 95 % TPR (`ood.detection_metrics`, what `evaluate --ood-dir` reports); and the images
the model flags as most unusual. A run trained before OOD scores gets one sentence instead."""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.decode import load_image
from ..openworld.ood import detection_metrics
from ..utils.errors import ImageError, RunError
from .explain import overlay_png
from .page import card, data_uri, figure_uri, gallery, table
from .plots import score_histograms

UNUSUAL = 12  # the most unusual images shown


@dataclass
class Scored:
    """A set of images with their OOD scores, as the page shows them."""

    name: str  # "test set DIR", "--ood-dir DIR"
    paths: list[str]
    scores: np.ndarray  # (N,) ood_score
    unknown: np.ndarray  # (N,) bool: above the threshold
    answers: list[str]  # the model's label (multi-label: its labels, comma-separated)
    truth: list[str] | None = None  # the true classes of a labelled set
    images: np.ndarray | None = None  # decoded (N, S, S, 3), where at hand
    skipped: int = 0  # files that could not be read

    @classmethod
    def of_labelled(cls, classifier, name: str, data, answer: dict) -> "Scored":
        """A labelled set (LabelledImages, decoded) and its `predict_open` answer."""
        return cls(name, list(data.paths), np.asarray(answer["ood_score"]), np.asarray(answer["unknown"]),
                   [joined(a) for a in classifier.labels(answer["probabilities"])],
                   [", ".join(data.names(i)) or "(none)" for i in range(len(data))], data.images)


def short(name: str) -> str:
    """"test set DIR" -> "test set", "--ood-dir DIR" -> "--ood-dir"."""
    return "test set" if name.startswith("test set") else name.split(" ", 1)[0]


def joined(label) -> str:
    return (", ".join(label) or "(none)") if isinstance(label, list) else str(label)


def score_folder(classifier, folder: str | Path, batch_size: int = 64, tta: bool = False) -> Scored:
    """Every image file below `folder`, scored as `predict` scores it (its records' ood_score and
    unknown); unreadable files are counted."""
    from ..data.listing import expand_inputs

    paths, scores, unknown, answers, skipped = [], [], [], [], 0
    for record in classifier.predict_files(expand_inputs([Path(folder)]), batch_size, tta=tta):
        if "error" in record:
            skipped += 1
            continue
        paths.append(record["path"])
        scores.append(record["ood_score"])
        unknown.append(record["unknown"])
        answers.append(joined(record.get("labels", record.get("label"))))
    if not paths:
        raise RunError(f"{folder}: no readable images (--ood-dir)")
    return Scored(f"--ood-dir {folder}", paths, np.asarray(scores), np.asarray(unknown, bool), answers,
                  skipped=skipped)


def ood_section(classifier, scored: list[Scored]) -> str:
    """The section's HTML: `scored` are the sets beside the validation images (the test set
    first, then an --ood-dir folder; either may be absent)."""
    if not classifier.has_ood:
        return (f'<p class="note" id="ood">No OOD scores: {html.escape(classifier.origin)} was trained before them '
                '(its model.json has no "ood" entry); train it again to see which images are unlike the training '
                'ones.</p>')
    world = classifier.open_world
    threshold, val = float(world.threshold), np.asarray(world.ood_scores, dtype=np.float64)
    groups = [("validation", val, val > threshold), *[(s.name, s.scores, s.unknown) for s in scored]]
    rows = [[name, len(s), f"{int(np.sum(u))} ({np.mean(u):.1%})", f"{np.median(s):.4f}", f"{np.max(s):.4f}"]
            for name, s, u in groups]
    uri = figure_uri(lambda f: score_histograms([(f"{name} (n = {len(s)})", s) for name, s, _ in groups], threshold,
                                                "OOD score", f))
    cards = [card("threshold", f"{threshold:.4f}", f"{world.keep:.0%} of the validation images pass it")]
    cards += [card(f"flagged: {short(name)}", f"{np.mean(u):.1%}", f"{int(np.sum(u))} of {len(s)} images")
              for name, s, u in groups]
    outside = next((s for s in scored if s.truth is None), None)
    labelled = next((s for s in scored if s.truth is not None), None)
    if outside is not None:  # evaluate --ood-dir's numbers: the labelled images against the folder's
        inside, against = (labelled.scores, "the test set") if labelled is not None else (val, "validation")
        found = detection_metrics(inside, outside.scores)
        cards += [card("AUROC", f"{found['auroc']:.4f}", f"--ood-dir against {against}"),
                  card("FPR at 95% TPR", f"{found['fpr_at_95_tpr']:.4f}",
                       f"--ood-dir passing where 95% of {against} pass")]
    skipped = "".join(f" {s.skipped} file(s) of {html.escape(s.name)} could not be read." for s in scored if s.skipped)
    note = ("The OOD score says how unlike the training images an image is (higher: more unusual; "
            f"method {html.escape(str(classifier.meta['ood'].get('method')))}). An image scoring above the threshold "
            "is flagged <code>unknown</code> by predict, evaluate and serve; its label stays the model's best class. "
            "The validation images fitted the threshold, so their share flagged is what it promises. Each histogram "
            "counts the share of its own set's images." + skipped
            + ((" AUROC and FPR at 95% TPR: the numbers <code>transferkit evaluate TEST_DIR --ood-dir DIR</code> "
                "gives (the --ood-dir images against the test set's)." if labelled is not None else
                " AUROC and FPR at 95% TPR are computed as <code>evaluate --ood-dir</code> computes them, with the "
                "validation images in place of a test set.") if outside is not None else
               " Give <code>--ood-dir DIR</code> (images unlike the training ones) for AUROC and FPR at 95% TPR."))
    return (f'<section id="ood"><h2>Unlike the training images: the OOD score</h2><div class="cards">{"".join(cards)}'
            f'</div><p class="note">{note}</p><figure><img alt="histogram of OOD scores" src="{uri}"></figure>'
            + table(["set", "images", "flagged unknown", "median score", "largest score"], rows)
            + f"<h3>The most unusual images</h3>{unusual_html(classifier, scored)}</section>")


def unusual_html(classifier, scored: list[Scored]) -> str:
    """The UNUSUAL highest-scoring images of the test set and the --ood-dir folder, highest first."""
    pool = [(s, i) for s in scored for i in range(len(s.paths))]
    if not pool:
        return ('<p class="note">The validation images\' scores are stored without their files: give a test folder '
                '(<code>transferkit report RUN TEST_DIR</code>) or <code>--ood-dir</code> to see the most unusual '
                'images.</p>')
    order = np.argsort(-np.array([s.scores[i] for s, i in pool]), kind="stable")[:UNUSUAL]
    figures, missing = [], 0
    for s, i in (pool[k] for k in order):
        try:
            image = s.images[i] if s.images is not None else load_image(s.paths[i], classifier.image_size,
                                                                       rules=classifier.rules)
        except ImageError:
            missing += 1  # the file changed since it was scored
            continue
        verdict = "<b>unknown</b>" if s.unknown[i] else "within the threshold"
        truth = f" (true: {html.escape(s.truth[i])})" if s.truth is not None else ""
        figures.append(
            f'<figure><img alt="unusual image {html.escape(Path(s.paths[i]).name)}" '
            f'src="{data_uri(overlay_png(image, np.zeros(image.shape[:2]), alpha=0))}"><figcaption>'
            f'<b>ood_score {s.scores[i]:.4f}</b>: {verdict}<br>answer {html.escape(s.answers[i])}{truth}<br>'
            f'from the {html.escape(s.name)}<br><span class="file">{html.escape(s.paths[i])}</span>'
            '</figcaption></figure>')
    return gallery(figures, f"The {len(order)} highest OOD scores among the {' and the '.join(html.escape(s.name) for s in scored)}"
                   ", highest first.", missing)
