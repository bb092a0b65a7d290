"""The building blocks of every page the package writes (a run's report, an anomaly run's): the
shared style and shell, figures and images as data URIs, tables, cards, galleries, and the sections
every run has (its skipped files, its settings). Everything is embedded: a page loads nothing."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from string import Template

from ..cfg.settings import grouped, shown
from ..predict.run import read_skipped

SHELL = Template("""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>transferkit report: $title</title>
<style>
:root { --ink: #1f2933; --muted: #616e7c; --line: #e4e7eb; --accent: #2f6fde; --bad: #c2362b; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--ink); background: #f5f7fa; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 24px 48px; }
header h1 { margin: 0 0 4px; font-size: 26px; }
header p { margin: 0; color: var(--muted); }
section { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 18px 22px; margin-top: 20px; }
h2 { margin: 0 0 12px; font-size: 19px; }
h3 { margin: 16px 0 8px; font-size: 15px; color: var(--muted); font-weight: 600; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(150px, 1fr)); gap: 12px; }
.card { border: 1px solid var(--line); border-radius: 8px; padding: 10px 14px; }
.card .label { color: var(--muted); font-size: 13px; }
.card .value { font-size: 24px; font-weight: 650; }
.card .sub { color: var(--muted); font-size: 12.5px; }
.note { color: var(--muted); font-size: 13.5px; margin: 10px 0 0; }
.warn { color: var(--bad); }
table { border-collapse: collapse; width: 100%; font-size: 14px; }
th, td { text-align: left; padding: 5px 10px; border-bottom: 1px solid var(--line); }
th { color: var(--muted); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.two { display: grid; grid-template-columns: 1fr 1fr; gap: 24px; }
@media (max-width: 800px) { .two { grid-template-columns: 1fr; } }
figure { margin: 0; }
figure img { max-width: 100%; height: auto; display: block; margin: 0 auto; }
.gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(240px, 1fr)); gap: 14px; }
.gallery figure { border: 1px solid var(--line); border-radius: 8px; overflow: hidden; }
.gallery figcaption { padding: 8px 10px; font-size: 13px; }
.gallery .file { color: var(--muted); word-break: break-all; }
code { font-size: 13px; }
</style></head>
<body><main>
<header><h1>$title</h1><p>$subtitle</p></header>
$body
<p class="note">Written by transferkit $version. Everything on this page is embedded; it loads nothing from the network.</p>
</main></body></html>
""")  # every page: a classifier run's report (report.py), an anomaly run's (anomaly_report.py)

def page(title: str, subtitle: str, body: str, meta: dict) -> str:
    """A whole self-contained page: the shared style, the header, `body` (HTML), the footer."""
    return SHELL.substitute(title=html.escape(title), subtitle=html.escape(subtitle), body=body,
                            version=html.escape(str(meta.get("versions", {}).get("transferkit", ""))))


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_uri(draw) -> str:
    """A figure drawn by `draw(file)` into memory, as a data URI."""
    buffer = io.BytesIO()
    draw(buffer)
    return data_uri(buffer.getvalue())


def table(header: list[str], rows: list[list], numeric_from: int = 1, escape: bool = True) -> str:
    """An HTML table; columns from `numeric_from` on are right-aligned; cells escaped unless they
    are HTML already (`escape=False`)."""
    def cells(values, tag):
        return "".join(f'<{tag}{" class=num" if i >= numeric_from else ""}>'
                       f'{html.escape(str(v)) if escape or tag == "th" else v}</{tag}>' for i, v in enumerate(values))
    body = "".join(f"<tr>{cells(r, 'td')}</tr>" for r in rows)
    return f"<table><thead><tr>{cells(header, 'th')}</tr></thead><tbody>{body}</tbody></table>"


def card(label: str, value: str, sub: str = "") -> str:
    return (f'<div class="card"><div class="label">{html.escape(label)}</div>'
            f'<div class="value">{html.escape(value)}</div><div class="sub">{html.escape(sub)}</div></div>')


def gallery(figures: list[str], note: str, missing: int) -> str:
    extra = f'<p class="note warn">{missing} of these files can no longer be read.</p>' if missing else ""
    return f'<p class="note">{note}</p><div class="gallery">{"".join(figures)}</div>{extra}'


def skipped_html(run_dir: Path, eval_skipped: list[tuple[str, str]]) -> str:
    lines = read_skipped(run_dir / "skipped.csv") if (run_dir / "skipped.csv").is_file() else []
    lines += list(eval_skipped)
    if not lines:
        return "<h3>Skipped files</h3><p>None: every file was a usable image.</p>"
    shown = "".join(f"<tr><td><code>{html.escape(p)}</code></td><td>{html.escape(r)}</td></tr>" for p, r in lines[:20])
    more = f'<p class="note">and {len(lines) - 20} more (skipped.csv)</p>' if len(lines) > 20 else ""
    return (f"<h3>Skipped files ({len(lines)})</h3><table><thead><tr><th>file</th><th>reason</th></tr></thead>"
            f"<tbody>{shown}</tbody></table>{more}")


def settings_html(meta: dict) -> str:
    """Every setting of the run, by group, from the settings' declarations; the ones changed from
    the defaults are marked."""
    config, auto = meta.get("config", {}), set(meta.get("auto_settings", []))
    rows = []
    for group, members in grouped():
        for name, _, default in members:
            if name in config:
                changed = config[name] != default and name not in auto
                note = "auto" if name in auto else f"default {shown(default)}" if changed else ""
                rows.append([group, f"<b>{name}</b>" if changed else name, html.escape(shown(config[name]))
                             + (f" <span class=\"note\">({html.escape(note)})</span>" if note else "")])
    decisions = "".join(f"<li>{html.escape(d)}</li>" for d in meta.get("decisions", []))
    return ("<h3>Settings</h3>" + table(["group", "setting", "value"], rows, numeric_from=3, escape=False)
            + '<p class="note">Bold: changed from the default. Auto: decided by the preset and the data'
            + (f':</p><ul class="note">{decisions}</ul>' if decisions else ".</p>"))
