"""The offline `dvc plots show` template: self-contained and wired into `.dvc/config`.

dvc-render fills the template by plain string replacement of `{plot_divs}` (required),
`{scripts}` and `{refresh_tag}`. `{scripts}` must stay out: DVC would put its CDN
<script src="https://cdn.jsdelivr.net/..."> tags back. DVC resolves a relative
`plots.html_template` against the `.dvc/` folder.
"""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "plots" / "offline_template.html"
# Major versions must match dvc-render's default page (vega 5, vega-lite 5, vega-embed 6).
LIBRARIES = {"vega": "5", "vega-lite": "5", "vega-embed": "6"}


@pytest.fixture(scope="module")
def html() -> str:
    assert TEMPLATE.is_file(), f"missing {TEMPLATE.relative_to(ROOT)}"
    return TEMPLATE.read_text(encoding="utf8")


def test_template_has_dvc_placeholders(html: str) -> None:
    assert html.count("{plot_divs}") == 1
    assert "{scripts}" not in html
    assert html.count("{refresh_tag}") <= 1


@pytest.mark.parametrize(("name", "major"), sorted(LIBRARIES.items()))
def test_library_inlined_with_licence_banner(html: str, name: str, major: str) -> None:
    banner = re.search(rf"/\*!\n \* {re.escape(name)} v({major}\.\d+\.\d+) ", html)
    assert banner, f"no inlined {name}@{major}.x banner"
    version = banner.group(1)
    body = html[banner.end() :]
    assert "License: BSD-3-Clause" in body[:2000]
    assert "University of Washington Interactive Data Lab" in body[:2000]
    # The minified build itself carries the same version string.
    assert f'"{version}"' in body[: body.index("</script>")]


def test_no_remote_scripts(html: str) -> None:
    tags = re.findall(r"<script\b[^>]*>", html, flags=re.IGNORECASE)
    assert len(tags) == len(LIBRARIES)
    assert not [t for t in tags if "src=" in t.lower()]
    assert '<script src="http' not in html
    assert "sourceMappingURL" not in html
    # Each inline script ends where intended: no stray closing tag inside the libraries.
    assert html.lower().count("</script") == len(LIBRARIES)


def test_template_size(html: str) -> None:
    assert TEMPLATE.stat().st_size < 2 * 1024 * 1024


def test_dvc_config_points_at_template() -> None:
    config = configparser.ConfigParser()
    config.read_string((ROOT / ".dvc" / "config").read_text())
    value = config.get("plots", "html_template")
    assert (ROOT / ".dvc" / value).resolve() == TEMPLATE.resolve()
