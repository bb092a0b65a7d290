"""The report's "Data check" section: what `train`'s own check found (the run's check.json: exact
and near-duplicate images shared by its training, validation and test sets), so that nobody reads
the accuracy above it without knowing whether the sets leak."""

from __future__ import annotations

import html
import json
from pathlib import Path

from .page import table

SHOWN = 10  # findings listed; the rest are counted


def check_section(run_dir: Path) -> str:
    path = Path(run_dir) / "check.json"
    if not path.is_file():
        return ('<section><h2>Data check</h2><p class="note">This run has no <code>check.json</code> (trained '
                'before train checked its own sets); <code>transferkit check DATA --test-dir T</code> checks '
                'them.</p></section>')
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        findings = [f for f in document["findings"] if isinstance(f, dict)]
        usable = {name: int(v["usable"]) for name, v in document.get("summary", {}).items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return ('<section><h2>Data check</h2><p class="note warn">check.json is unreadable or not the check\'s '
                'document: the sets\' leak check cannot be shown.</p></section>')
    sets = ", ".join(f"{html.escape(name)} {n}" for name, n in usable.items())
    leaks = [f for f in findings if f.get("kind") == "leak"]
    conflicts = sum(f.get("kind") == "label_conflict" for f in findings)
    if not leaks:
        return (f'<section><h2>Data check</h2><p class="note">No image is shared by two of the run\'s sets ({sets} '
                'usable images), either as the same pixels or as a near-duplicate (perceptual hashes confirmed by '
                'aligned thumbnails). Duplicates inside one set, outliers and label errors: '
                '<code>transferkit check</code>.</p></section>')
    rows = [[", ".join(html.escape(str(s)) for s in f.get("sets", [])),
             "same pixels" if f.get("score") == 1 else f"near-duplicate ({float(f.get('score', 0)):.3f})",
             "<br>".join(html.escape(str(p)) for p in f.get("paths", [])[:4])
             + (f"<br>... {len(f['paths']) - 4} more" if len(f.get("paths", [])) > 4 else "")]
            for f in leaks[:SHOWN]]
    more = f" The first {SHOWN} are listed; check.json has them all." if len(leaks) > SHOWN else ""
    return (f'<section><h2>Data check</h2><p class="note warn"><strong>{len(leaks)} cluster(s) of the same or '
            f'near-duplicate images span the run\'s sets</strong> ({sets} usable images)'
            + (f", {conflicts} with conflicting labels" if conflicts else "")
            + f': the numbers above are optimistic where they count such images.{more}</p>'
            + table(["sets", "match", "images"], rows, numeric_from=3, escape=False) + "</section>")
