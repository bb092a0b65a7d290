"""The docs' figures, rendered from the results files that the bench scripts write (bench/results/).

    python tools/docs_tables.py            # render every results table and figure in README.md and docs/*.md
    python tools/docs_tables.py --check    # what `make docs-check` runs: exit 1 on anything stale or unbacked

Two ways a figure may appear in README.md and docs/benchmarks.md, and no other:

- a table, between markers; the tool writes what is between them from the named table of
  bench/results/FILE.json (TABLE defaults to FILE), with a line saying where and how it was
  measured:

      <!-- results:FILE/TABLE -->
      ...
      <!-- /results -->

- a number in the text, as a reference that the tool fills in from the file's `figures`:

      <!-- fig:FILE/NAME -->3.0x<!-- /fig -->

The check fails when a rendered table or figure differs from its results file, when a marker names
a file, table or figure that does not exist, and when README.md or docs/benchmarks.md quotes a
measurement outside those markers: a number with a unit of measure (%, s, ms, x as in 3.0x, MiB,
GiB, MB, GB, images/s, requests/s, points, minutes, hours) anywhere but in code (`...` or a
fenced block), a results table, a figure reference or the generated options table. A figure
without a results file is taken out, leaving the command that would measure it.

A results file (bench/results.py writes it) holds, besides its provenance:

    "tables":  {"NAME": {"columns": [{"title": "images/s", "key": "speed", "format": "{:.1f}"}, ...],
                         "rows": [{"speed": 61.9, ...}, ...]}}
    "figures": {"NAME": {"value": 2.99, "format": "{:.1f}x"}}

Standard library only, so that it runs before `make setup`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]  # where results markers are rendered
STRICT = [ROOT / "README.md", ROOT / "docs" / "benchmarks.md"]  # where no figure may stand without a file

TABLE = re.compile(r"(<!-- results:([\w.-]+)(?:/([\w.-]+))? -->\n)(.*?)(<!-- /results -->)", re.S)
FIGURE = re.compile(r"(<!-- fig:([\w.-]+)/([\w.-]+) -->)(.*?)(<!-- /fig -->)", re.S)
UNIT = re.compile(r"(?<![\w.])(\d[\d,]*(?:\.\d+)?)(?:\s?(%|ms|s|MiB|GiB|KiB|MB|GB|kB|images/s|requests/s|"
                  r"points?|minutes?|hours?)(?![\w/])|x(?![\w]))")
NOT_MEASURED = {"95 %"}  # the confidence level of an interval, not a measurement
HIDDEN = [re.compile(p, re.S) for p in (
    r"```.*?```", r"`[^`\n]*`", r"<!-- options:start -->.*?<!-- options:end -->", TABLE.pattern, FIGURE.pattern,
    r"<!--.*?-->", r"\]\([^)]*\)")]


class Missing(Exception):
    """A marker names a results file, table or figure that does not exist."""


def load(name: str) -> dict:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        raise Missing(f"no results file bench/results/{name}.json")
    return json.loads(path.read_text(encoding="utf-8"))


def cell(value, fmt: str | None) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if fmt is None:
        return str(value)
    return fmt.format(value)


def provenance_line(name: str, data: dict) -> str:
    p = data.get("provenance", {})
    quiet = p.get("quiet")
    share = p.get("others_cpu_share")
    state = ("quiet" if quiet else f"not quiet: other work used {share:.0%} of the cores" if share is not None
             else "not quiet") if quiet is not None else "quiet: not measured"
    dirty = " with uncommitted changes" if p.get("dirty") else ""
    return (f"*`bench/results/{name}.json`: `{p.get('command', '?')}`, commit {p.get('commit', '?')}{dirty}, "
            f"{str(p.get('date', '?'))[:10]}, {p.get('cores', '?')} cores, {state}.*")


def render_table(name: str, table: str | None) -> str:
    data = load(name)
    key = table or name
    tables = data.get("tables", {})
    if key not in tables:
        raise Missing(f"bench/results/{name}.json has no table {key!r} (it has {', '.join(tables) or 'none'})")
    spec = tables[key]
    columns = spec["columns"]
    lines = ["| " + " | ".join(c["title"] for c in columns) + " |",
             "|" + "|".join("---:" if c.get("align") == "right" else "---" for c in columns) + "|"]
    for row in spec["rows"]:
        lines.append("| " + " | ".join(cell(row.get(c["key"]), c.get("format")) for c in columns) + " |")
    if spec.get("note"):
        lines += ["", spec["note"]]
    lines += ["", provenance_line(name, data)]
    return "\n".join(lines) + "\n"


def render_figure(name: str, figure: str) -> str:
    figures = load(name).get("figures", {})
    if figure not in figures:
        raise Missing(f"bench/results/{name}.json has no figure {figure!r} (it has {', '.join(figures) or 'none'})")
    return cell(figures[figure]["value"], figures[figure].get("format"))


def render(text: str, where: str, problems: list[str]) -> str:
    """The text with every table and figure rendered; what could not be rendered goes to `problems`."""
    def table(m: re.Match) -> str:
        try:
            return m.group(1) + render_table(m.group(2), m.group(3)) + m.group(5)
        except Missing as exc:
            problems.append(f"{where}: results:{m.group(2)}{'/' + m.group(3) if m.group(3) else ''}: {exc}")
            return m.group(0)

    def figure(m: re.Match) -> str:
        try:
            return m.group(1) + render_figure(m.group(2), m.group(3)) + m.group(5)
        except Missing as exc:
            problems.append(f"{where}: fig:{m.group(2)}/{m.group(3)}: {exc}")
            return m.group(0)

    return FIGURE.sub(figure, TABLE.sub(table, text))


def unbacked(text: str) -> list[tuple[int, str]]:
    """(line, figure) of every measurement quoted outside code and the markers."""
    for pattern in HIDDEN:  # blank out what may hold figures, keeping the line numbers
        text = pattern.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
    found = []
    for m in UNIT.finditer(text):
        quoted = re.sub(r"\s+", " ", m.group(0))
        if quoted not in NOT_MEASURED:
            found.append((text.count("\n", 0, m.start()) + 1, quoted))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if anything is stale or unbacked")
    args = parser.parse_args(argv)
    problems: list[str] = []
    for path in DOCS:
        if not path.is_file():
            continue
        where = str(path.relative_to(ROOT))
        text = path.read_text(encoding="utf-8")
        new = render(text, where, problems)
        if new != text:
            if args.check:
                old_lines, new_lines = text.splitlines(), new.splitlines()
                first = next((i for i, (a, b) in enumerate(zip(old_lines, new_lines)) if a != b),
                             min(len(old_lines), len(new_lines)))
                problems.append(f"{where}:{first + 1}: differs from its results file (run: python tools/docs_tables.py)")
            else:
                path.write_text(new, encoding="utf-8")
                print(f"rendered {where}")
        if path in STRICT:
            problems += [f"{where}:{line}: '{figure}' is quoted without a results file (a table or figure marker; "
                         "see tools/docs_tables.py)" for line, figure in unbacked(new)]
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
