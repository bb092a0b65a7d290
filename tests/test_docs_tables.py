"""tools/docs_tables.py: the docs' tables and figures come from results files, and the check refuses
a stale table, a marker without its file and a measurement quoted without one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import docs_tables  # noqa: E402

RESULT = {"provenance": {"commit": "abc1234", "dirty": False, "date": "2026-12-06T21:00:00Z", "cores": 2,
                         "command": "bench/x.py", "quiet": False, "others_cpu_share": 0.43},
          "tables": {"speed": {"columns": [{"title": "engine", "key": "engine"},
                                           {"title": "images/s", "key": "speed", "format": "{:.1f}", "align": "right"}],
                               "rows": [{"engine": "torch", "speed": 61.94}, {"engine": "onnx", "speed": None}]}},
          "figures": {"ratio": {"value": 2.987, "format": "{:.1f}x"}}}


@pytest.fixture()
def docs(tmp_path, monkeypatch):
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "x.json").write_text(json.dumps(RESULT))
    (tmp_path / "docs").mkdir()
    monkeypatch.setattr(docs_tables, "ROOT", tmp_path)
    monkeypatch.setattr(docs_tables, "RESULTS", tmp_path / "bench" / "results")
    monkeypatch.setattr(docs_tables, "DOCS", [tmp_path / "README.md"])
    monkeypatch.setattr(docs_tables, "STRICT", [tmp_path / "README.md"])
    return tmp_path


def test_tables_and_figures_are_rendered_then_the_check_passes(docs):
    (docs / "README.md").write_text("Speed:\n\n<!-- results:x/speed -->\nold\n<!-- /results -->\n\n"
                                    "ONNX is <!-- fig:x/ratio -->1.0x<!-- /fig --> faster; `--timeout 10 s` is code.\n")
    assert docs_tables.main(["--check"]) == 1  # stale
    assert docs_tables.main([]) == 0
    text = (docs / "README.md").read_text()
    assert "| engine | images/s |\n|---|---:|\n| torch | 61.9 |\n| onnx |  |\n" in text
    assert "commit abc1234, 2026-12-06, 2 cores, not quiet: other work used 43% of the cores" in text
    assert "<!-- fig:x/ratio -->3.0x<!-- /fig -->" in text
    assert docs_tables.main(["--check"]) == 0


def test_the_check_refuses_unbacked_figures_and_missing_files(docs, capsys):
    (docs / "README.md").write_text("Training took 195 s and scored 86.1 %, 3.0x faster, 5.6 GB; the 95 % "
                                    "interval; 224 px, 8 epochs, 7 x 7, 2 cores.\n<!-- fig:y/ratio -->1<!-- /fig -->\n")
    assert docs_tables.main(["--check"]) == 1
    err = capsys.readouterr().err
    quoted = [line.split("'")[1] for line in err.splitlines() if "is quoted without" in line]
    assert quoted == ["195 s", "86.1 %", "3.0x", "5.6 GB"]  # not the interval's level, sizes, counts
    assert "fig:y/ratio: no results file bench/results/y.json" in err

def test_the_repository_docs_pass_the_check():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "docs_tables.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
