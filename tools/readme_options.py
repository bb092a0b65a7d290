"""Write the README's options table from the settings' declarations (transferkit/config.py).

    python tools/readme_options.py          # tests/test_config.py checks that it is up to date
"""

from __future__ import annotations

import re
from pathlib import Path

from transferkit.cfg.settings import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


def main() -> None:
    text = README.read_text(encoding="utf-8")
    new, count = re.subn(r"<!-- options:start -->\n.*?<!-- options:end -->",
                         lambda _: f"<!-- options:start -->\n{markdown_table()}\n<!-- options:end -->", text, flags=re.S)
    if count != 1:
        raise SystemExit(f"{README}: expected one options:start/options:end block, found {count}")
    README.write_text(new, encoding="utf-8")


if __name__ == "__main__":
    main()
