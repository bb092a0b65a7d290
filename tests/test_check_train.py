"""`train`'s own check (issue 26, points 2 and 3): near-duplicates of training images in --val-dir
and --test-dir are named in a warning, and every run records the leaks between the sets it used
in its check.json (the schema of `check --format json`), on real texture tiles with planted
copies (JPEG quality 60, resized, brightened)."""

from __future__ import annotations

import html
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from test_check import copy_of, save, tiles
from transferkit.cli import app
from transferkit.curate.check import KINDS
from transferkit.data.leaks import cross_pairs, leak_document, leak_findings
from transferkit.data.listing import LabelledImages

TINY = ["--image-size", "32", "--epochs", "1", "--fine-tune-epochs", "0", "--cache-dir", ""]


def decoded(paths: list[str], classes: list[str], label: int, side: int = 64) -> LabelledImages:
    images = np.stack([np.asarray(Image.open(p).convert("RGB").resize((side, side))) for p in paths])
    return LabelledImages(paths, np.full(len(paths), label), classes, images=images)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """train/: 12 brick and 12 grass tiles; val/: 4 other tiles of each plus a JPEG-60 copy of a
    training brick; test/: 4 other tiles of each plus a resized and a brightened copy of training
    grass tiles. Returns the root, {val copy: original}, {test copy: original}."""
    root = tmp_path_factory.mktemp("leaks")
    val_copies, test_copies = {}, {}
    for name in ("brick", "grass"):
        found = tiles(name)
        save(root / "train", name, found[:12])
        save(root / "val", name, found[12:16])
        save(root / "test", name, found[16:20])
    brick, grass = tiles("brick"), tiles("grass")
    path = root / "val" / "brick" / "copy-jpeg60.png"
    copy_of(brick[2], "jpeg60").save(path)
    val_copies[str(path)] = str(root / "train" / "brick" / "002.png")
    for i, kind in ((5, "resized"), (7, "brighter")):
        path = root / "test" / "grass" / f"copy-{kind}.png"
        copy_of(grass[i], kind).save(path)
        test_copies[str(path)] = str(root / "train" / "grass" / f"{i:03d}.png")
    return root, val_copies, test_copies


def test_leak_findings_name_exactly_the_planted_pairs(sets):
    root, val_copies, test_copies = sets
    parts = {}
    for name in ("train", "val", "test"):
        brick = sorted(str(p) for p in (root / name / "brick").glob("*.png"))
        grass = sorted(str(p) for p in (root / name / "grass").glob("*.png"))
        a, b = decoded(brick, ["brick", "grass"], 0), decoded(grass, ["brick", "grass"], 1)
        parts[name] = LabelledImages(a.paths + b.paths, np.r_[a.labels, b.labels], a.classes,
                                     images=np.concatenate([a.images, b.images]))
    findings = leak_findings(parts)
    assert [f["kind"] for f in findings] == ["leak"] * 3  # no label conflicts: copies keep their class
    assert {(c, o) for c, o, _ in cross_pairs(findings, "val")} == set(val_copies.items())
    assert {(c, o) for c, o, _ in cross_pairs(findings, "test")} == set(test_copies.items())
    assert all(0 < f["score"] <= 1 and f["pairs"][0]["match"] >= 0.95 for f in findings)
    document = leak_document(findings, {k: len(v) for k, v in parts.items()})
    assert document["counts"]["leak"] == 3 and document["exit_code"] == 1 and set(document["counts"]) == set(KINDS)
    # one set alone cannot leak; a copy relabelled is a label conflict too
    assert leak_findings({"train": parts["train"]}) == []
    test = parts["test"]
    relabelled = LabelledImages(test.paths, 1 - test.labels, test.classes, images=test.images)
    kinds = [f["kind"] for f in leak_findings({"train": parts["train"], "test": relabelled})]
    assert kinds == ["leak", "leak", "label_conflict", "label_conflict"]


@pytest.mark.slow  # trains a model
def test_train_warns_about_val_and_test_near_duplicates_and_records_them(sets, tmp_path):
    root, val_copies, test_copies = sets
    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", str(root / "train"), "--out", str(run), "--val-dir", str(root / "val"),
                                      "--test-dir", str(root / "test"), *TINY])
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("Warning:")]
    val_line = next(line for line in warnings if "validation image(s)" in line)
    test_line = next(line for line in warnings if "test image(s)" in line)
    assert val_line.startswith("Warning: 1 validation image(s)") and all(c in val_line for c in val_copies)
    assert test_line.startswith("Warning: 2 test image(s)")
    assert all(c in test_line and o in test_line for c, o in test_copies.items())
    document = json.loads((run / "check.json").read_text())
    assert document["counts"]["leak"] == 3 and document["summary"]["test"]["usable"] == 10
    linked = {frozenset((p["a"], p["b"])) for f in document["findings"] for p in f["pairs"]}
    assert linked == {frozenset(pair) for pair in {**val_copies, **test_copies}.items()}
    assert json.loads((run / "model.json").read_text())["check"] == {"file": "check.json", "counts": {"leak": 3}}
    # the report shows them, before anyone reads its accuracy: the three clusters with their images
    page = (run / "report.html").read_text()
    section = page[page.index("<h2>Data check</h2>"):]
    section = section[:section.index("</section>")]
    assert "3 cluster(s) of the same or near-duplicate images span the run's sets" in section
    assert all(html.escape(p) in section for p in [*val_copies, *val_copies.values(), *test_copies])
    assert page.index("<h2>Data check</h2>") < page.index("Most confident mistakes")


@pytest.mark.slow  # trains a model
def test_the_runs_own_split_records_no_leak_when_grouped_and_the_leak_when_not(tmp_path):
    found = tiles("brick")[:10] + tiles("grass")[:10]
    data = tmp_path / "data"
    save(data, "brick", found[:10])
    save(data, "grass", found[10:])
    for i in range(10):  # every image has a JPEG-60 copy: an ungrouped split must separate some pairs
        copy_of(found[i], "jpeg60").save(data / "brick" / f"copy{i}.png")
        copy_of(found[10 + i], "jpeg60").save(data / "grass" / f"copy{i}.png")
    counts = {}
    for grouped in (True, False):
        run = tmp_path / f"run-{grouped}"
        result = CliRunner().invoke(app, ["train", str(data), "--out", str(run), "--val-split", "0.3", *TINY,
                                          "--group-duplicates" if grouped else "--no-group-duplicates"])
        assert result.exit_code == 0, result.output
        counts[grouped] = json.loads((run / "check.json").read_text())["counts"]["leak"]
        if not grouped:
            assert "Warning: the validation split shares" in result.output
    assert counts[True] == 0 and counts[False] >= 1, counts



def test_the_reports_data_check_section_says_what_check_json_holds(tmp_path):
    from transferkit.reports.check_section import check_section

    assert "has no <code>check.json</code>" in check_section(tmp_path)  # a run from before the check
    (tmp_path / "check.json").write_text("{not json")
    assert "unreadable" in check_section(tmp_path) and "warn" in check_section(tmp_path)
    (tmp_path / "check.json").write_text(json.dumps(leak_document([], {"train": 12, "val": 8})))
    clean = check_section(tmp_path)
    assert "No image is shared by two of the run's sets (train 12, val 8 usable images)" in clean
    assert "warn" not in clean
