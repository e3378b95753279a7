"""Build the page `dvc plots show` fills in: dvc_plots_template/page.html.

    python -m tools.plots_page           # rebuild page.html from the vendored scripts
    python -m tools.plots_page --check   # exit 1 when page.html is out of date

DVC's own page loads Vega, Vega-Lite and Vega-Embed from a CDN, so offline its charts
vanish. ``.dvc/config`` points ``plots.html_template`` at page.html instead, which holds
the three scripts inline (checked against the sha256 in dvc_plots_template/vendor.json)
and leaves out DVC's ``{scripts}`` placeholder, so no CDN tag is written. DVC fills in
``{plot_divs}`` only; a chart that fails to draw shows a line saying so.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "dvc_plots_template"
PAGE = "page.html"
MANIFEST = "vendor.json"
# In load order: vega-lite needs vega, vega-embed needs both.
SCRIPTS = ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js")

HEAD = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC plots</title>
    <!-- Built by `python -m tools.plots_page` from the vendored scripts beside it: edit that
         module, not this file. Nothing here is fetched from the network. -->
    <style>
        body { font-family: sans-serif; margin: 16px; }
        table { border-spacing: 15px; }
        .plot-failed { color: #b00020; border: 1px dashed #b00020; padding: 12px;
                       margin: 8px 0; max-width: 640px; }
    </style>
"""

# DVC writes each chart as <div id=...><script>vegaEmbed('#id', spec);</script></div>.
# This wrapper draws the same chart as SVG (sharp at any zoom, its text in the page), and
# puts a line in its place when it cannot be drawn.
FALLBACK = """
(function () {
    var embed = window.vegaEmbed;
    window.vegaEmbed = function (target, spec, options) {
        function placeholder(reason) {
            var element = document.querySelector(target);
            if (!element) { return; }
            var note = document.createElement("p");
            note.className = "plot-failed";
            var title = spec && spec.title;
            note.textContent = "This chart could not be drawn (" + reason + "): " +
                ((title && (title.text || title)) || target);
            element.appendChild(note);
        }
        if (typeof embed !== "function") {
            placeholder("Vega-Embed did not load");
            return Promise.resolve(null);
        }
        try {
            var settings = Object.assign({ renderer: "svg" }, options || {});
            return embed(target, spec, settings).catch(function (error) {
                placeholder(error && error.message ? error.message : String(error));
            });
        } catch (error) {
            placeholder(error && error.message ? error.message : String(error));
            return Promise.resolve(null);
        }
    };
})();
"""

TAIL = """</head>
<body>
    {plot_divs}
</body>
</html>
"""


def check_vendored(template_dir: Path) -> dict[str, str]:
    """The vendored scripts' text, by file name, after checking each against vendor.json."""
    manifest = json.loads((template_dir / MANIFEST).read_text())
    scripts: dict[str, str] = {}
    for name in SCRIPTS:
        path = template_dir / name
        content = path.read_bytes()
        expected = manifest[name]["sha256"]
        actual = hashlib.sha256(content).hexdigest()
        if actual != expected:
            raise ValueError(f"{path}: sha256 {actual}, but {MANIFEST} pins {expected}")
        text = content.decode("utf-8")
        if "</script" in text.lower():
            raise ValueError(f"{path}: holds '</script', which would end the inline script")
        scripts[name] = text
    return scripts


def build_page(template_dir: Path) -> str:
    """The HTML template DVC fills in, with the three scripts inline."""
    manifest = json.loads((template_dir / MANIFEST).read_text())
    parts = [HEAD]
    for name, text in check_vendored(template_dir).items():
        pinned = manifest[name]
        parts.append(f'    <script data-package="{pinned["package"]}@{pinned["version"]}">\n')
        parts.append(text.rstrip("\n") + "\n    </script>\n")
    parts.append(f"    <script>{FALLBACK}    </script>\n")
    parts.append(TAIL)
    return "".join(parts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tools.plots_page",
        description="Build dvc_plots_template/page.html, the offline page of `dvc plots show`.",
    )
    parser.add_argument(
        "--check", action="store_true", help="only check that page.html is up to date"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    target = TEMPLATE_DIR / PAGE
    try:
        page = build_page(TEMPLATE_DIR)
    except (OSError, KeyError, ValueError) as error:
        print(f"plots_page: {error}", file=sys.stderr)
        return 1
    if args.check:
        if not target.is_file() or target.read_text(encoding="utf-8") != page:
            print(
                f"plots_page: {target} is out of date: run python -m tools.plots_page",
                file=sys.stderr,
            )
            return 1
        return 0
    target.write_text(page, encoding="utf-8")
    print(target)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
