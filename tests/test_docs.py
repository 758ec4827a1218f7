"""The manual against the code: it cannot drift from what the code accepts.

- `docs/reference/params.md` lists every key of the params models in `covidseg/config.py`, with
  its default and the stages whose `params:` in `dvc.yaml` include it, and no page names a key
  that does not exist;
- `docs/reference/cli.md` lists every option of `covidseg` and of each stage script, and no
  option that does not exist;
- the tests named in the fault table exist;
- the README's links into `docs/` resolve, and the README stays a front door (<= 170 lines);
- every picture a page or the README shows exists, has alt text and stays small, and every
  file in `docs/assets/` is shown somewhere;
- `mkdocs build --strict` succeeds (a broken link, anchor or a page left out of the navigation
  fails it), where mkdocs is installed.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from covidseg.cli import parser as covidseg_parser
from covidseg.config import MOVED_KEYS, Params

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
PARAMS_PAGE = DOCS / "reference" / "params.md"
CLI_PAGE = DOCS / "reference" / "cli.md"
FAULTS_PAGE = DOCS / "reference" / "faults.md"
README_MAX_LINES = 170
SEPARATOR = re.compile(r"^\|(\s*:?-+:?\s*\|)+\s*$")
CODE = re.compile(r"`([^`]+)`")
FILE_SUFFIXES = {"json", "py", "csv", "md", "png", "h5", "pt", "pt2", "yaml", "lock", "db"}


# --- Markdown helpers ---------------------------------------------------------------------


def prose_lines(text: str) -> Iterator[str]:
    """The lines of a Markdown text outside fenced code blocks."""
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield line


def table_rows(text: str) -> dict[str, list[list[str]]]:
    """The body rows of the tables under each heading: {heading: [[cell, ...], ...]}."""
    sections: dict[str, list[list[str]]] = {}
    heading = ""
    lines = list(prose_lines(text))
    for i, line in enumerate(lines):
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
            sections.setdefault(heading, [])
        elif line.startswith("|") and not SEPARATOR.match(line):
            header = i + 1 < len(lines) and bool(SEPARATOR.match(lines[i + 1]))
            if not header:
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                sections.setdefault(heading, []).append(cells)
    return sections


def code_spans(text: str) -> list[str]:
    """The inline code of a Markdown text (fenced blocks left out)."""
    return [span for line in prose_lines(text) for span in CODE.findall(line)]


# --- params -------------------------------------------------------------------------------


def param_keys(model: type[BaseModel] = Params, prefix: str = "") -> dict[str, Any]:
    """Every leaf key of the params models (`train.loss.bce_weight`) with its default."""
    keys: dict[str, Any] = {}
    defaults = model().model_dump(mode="json")
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            keys |= param_keys(annotation, f"{prefix}{name}.")
        else:
            keys[f"{prefix}{name}"] = defaults[name]
    return keys


def groups() -> set[str]:
    """The section names (`train`, `train.loss`, ...): they may be named as well as leaves."""
    return {k.rsplit(".", i)[0] for k in param_keys() for i in range(1, k.count(".") + 1)}


def stages_of(key: str) -> set[str]:
    """The stages of `dvc.yaml` whose `params:` include `key` (an entry or a section above it)."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    found = set()
    for name, stage in stages.items():
        for entry in stage.get("params", []):
            if isinstance(entry, str) and (key == entry or key.startswith(entry + ".")):
                found.add(name)
    return found


def params_table() -> dict[str, list[str]]:
    """The reference page's rows by key (the first cell, in code formatting)."""
    rows: dict[str, list[str]] = {}
    for section in table_rows(PARAMS_PAGE.read_text()).values():
        for cells in section:
            if match := re.fullmatch(r"`([a-z0-9_.]+)`", cells[0]):
                assert match[1] not in rows, f"params.md: {match[1]} has two rows"
                rows[match[1]] = cells
    return rows


def test_every_param_key_is_documented_and_no_other() -> None:
    keys, rows = set(param_keys()), set(params_table())
    assert not keys - rows, (
        f"keys of params.yaml missing from docs/reference/params.md: {keys - rows}"
    )
    assert not rows - keys, (
        f"docs/reference/params.md documents keys that do not exist: {rows - keys}"
    )


def test_param_defaults_match_the_code() -> None:
    rows = params_table()
    for key, default in param_keys().items():
        cell = rows[key][2]
        if isinstance(default, dict):
            continue  # a mapping (download.sha256) is described in words
        match = re.fullmatch(r"`([^`]*)`", cell)
        assert match, f"params.md: {key}: write the default in code formatting, got {cell!r}"
        assert yaml.safe_load(match[1]) == default, f"params.md: {key}: default is {default!r}"


def test_param_reruns_match_dvc_yaml() -> None:
    rows = params_table()
    for key in param_keys():
        cell = rows[key][3]
        listed = set() if cell == "none" else {s.strip() for s in cell.split(",")}
        assert listed == stages_of(key), (
            f"params.md: {key} reruns {sorted(stages_of(key)) or 'none'} per dvc.yaml, "
            f"the page says {cell!r}"
        )


def named_keys(text: str) -> set[str]:
    """`section.key` names in inline code (also `key: value` and `key=value` forms), files
    such as `train.json` left out."""
    sections = "|".join(sorted(Params.model_fields))
    pattern = re.compile(rf"((?:{sections})\.[a-z0-9_]+(?:\.[a-z0-9_]+)*)(?:\s*[:=].*)?")
    names = set()
    for span in code_spans(text):
        match = pattern.fullmatch(span.strip())
        if match and match[1].rsplit(".", 1)[-1] not in FILE_SUFFIXES:
            names.add(match[1])
    return names


def pages() -> list[Path]:
    return [README, *sorted(DOCS.rglob("*.md"))]


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_name_no_param_that_does_not_exist(page: Path) -> None:
    known = set(param_keys()) | groups() | {f"{s}.{k}" for s, k in MOVED_KEYS}
    unknown = named_keys(page.read_text()) - known
    assert not unknown, f"{page.relative_to(ROOT)} names params that do not exist: {unknown}"


def test_the_params_check_sees_a_missing_and_an_invented_key() -> None:
    text = PARAMS_PAGE.read_text()
    assert "train.lr" in named_keys(text)
    assert "train.no_such_key" in named_keys("see `train.no_such_key: 3`")
    assert not named_keys("`metrics/folds/0/train.json` and `train.json`")
    assert "train.loss.bce_weight" in param_keys() and "train.loss" in groups()
    assert stages_of("evaluate.threshold") == {"train", "evaluate"}
    assert stages_of("runtime.device") == set()


# --- command line -------------------------------------------------------------------------


def parser_options(parser: argparse.ArgumentParser) -> set[str]:
    """Option strings and positional metavars of one parser, help left out."""
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction | argparse._SubParsersAction):
            continue
        if action.option_strings:
            found |= set(action.option_strings)
        else:
            found.add(str(action.metavar or action.dest))
    return found


def covidseg_commands() -> dict[str, set[str]]:
    """`covidseg` and each of its subcommands, by the heading the reference uses."""
    root = covidseg_parser()
    commands = {"covidseg": parser_options(root)}
    for action in root._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                commands[f"covidseg {name}"] = parser_options(sub)
    return commands


def script_options(path: Path) -> set[str]:
    """The options a stage script's `add_argument` calls declare (read from the source)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "add_argument"
        ):
            found |= {a.value for a in node.args if isinstance(a, ast.Constant)}
    return {str(option) for option in found}


def documented_options() -> dict[str, set[str]]:
    """The first cell's code spans of every table row, by heading."""
    return {
        heading: {span for cells in rows for span in CODE.findall(cells[0])}
        for heading, rows in table_rows(CLI_PAGE.read_text()).items()
        if rows
    }


def expected_options() -> dict[str, set[str]]:
    scripts = {
        f"stages/{p.name}": script_options(p) for p in sorted((ROOT / "stages").glob("*.py"))
    }
    return covidseg_commands() | scripts


def test_every_command_line_option_is_documented_and_no_other() -> None:
    expected, documented = expected_options(), documented_options()
    assert set(documented) == set(expected), (
        f"cli.md documents commands {sorted(documented)}, the code has {sorted(expected)}"
    )
    for command, options in expected.items():
        missing, extra = options - documented[command], documented[command] - options
        assert not missing, f"cli.md: {command}: options missing from the page: {missing}"
        assert not extra, f"cli.md: {command}: options that do not exist: {extra}"


def test_the_cli_check_sees_the_real_options() -> None:
    commands = covidseg_commands()
    assert {"--model", "-o", "--output", "CT", "--precision"} <= commands["covidseg predict"]
    assert "--version" in commands["covidseg"]
    assert {"--fold", "--epoch-log", "--params"} <= script_options(ROOT / "stages" / "train.py")


# --- fault table, README, build -----------------------------------------------------------


def test_the_fault_table_names_tests_that_exist() -> None:
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)", FAULTS_PAGE.read_text())
    assert len(named) > 10
    for module, test in named:
        source = (ROOT / "tests" / module).read_text()
        assert re.search(rf"def {test}", source), f"faults.md names {module}::{test}, not found"


def slug(heading: str) -> str:
    """A heading's anchor as GitHub and MkDocs both make it for plain words."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"\s", "-", text)


def anchors(page: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in prose_lines(page.read_text()) if line[:1] == "#"}


def test_readme_links_into_docs_resolve() -> None:
    links = re.findall(r"\]\((docs/[^)\s]+)\)", README.read_text())
    assert len(links) >= 5, "the README should point into the manual"
    for link in links:
        target, _, anchor = link.partition("#")
        path = ROOT / target
        assert path.is_file(), f"README links to {link}: no such file"
        assert not anchor or anchor in anchors(path), f"README links to {link}: no such heading"


def test_readme_stays_a_front_door() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


# --- pictures -----------------------------------------------------------------------------

ASSETS = DOCS / "assets"
IMAGE_MAX_BYTES = 200_000
MD_IMAGE = re.compile(r"!\[([^\]]*)\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_IMAGE = re.compile(r"<img\b[^>]*>", re.IGNORECASE)
HTML_ATTR = re.compile(r"""\b(src|alt)\s*=\s*(?:"([^"]*)"|'([^']*)')""", re.IGNORECASE)


def images(text: str) -> list[tuple[str, str]]:
    """(alt text, target) of every picture a Markdown text shows, fenced code left out:
    `![alt](target)` and `<img src=... alt=...>`."""
    # an alt text may wrap onto the next lines; inline code shows syntax, not pictures
    prose = "\n".join(CODE.sub("``", line) for line in prose_lines(text))
    found = [(" ".join(alt.split()), target) for alt, target in MD_IMAGE.findall(prose)]
    for tag in HTML_IMAGE.findall(prose):
        attrs = {m[0].lower(): m[1] or m[2] for m in HTML_ATTR.findall(tag)}
        found.append((" ".join(attrs.get("alt", "").split()), attrs.get("src", "")))
    return found


def shown_images() -> dict[Path, list[tuple[str, str]]]:
    """The pictures of every page and the README, by page."""
    return {page: images(page.read_text()) for page in pages()}


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_pictures_exist_have_alt_text_and_stay_small(page: Path) -> None:
    where = page.relative_to(ROOT)
    for alt, target in images(page.read_text()):
        assert alt, f"{where}: the picture {target} has no alt text"
        assert "://" not in target and not target.startswith("/"), (
            f"{where}: {target}: pictures are files of the repository, linked relatively"
        )
        path = (page.parent / target.partition("#")[0]).resolve()
        assert path.is_file(), f"{where} shows {target}: no such file"
        size = path.stat().st_size
        assert size <= IMAGE_MAX_BYTES, (
            f"{where} shows {target}: {size} bytes, over {IMAGE_MAX_BYTES}; downscale it"
        )


def test_every_asset_is_shown_somewhere() -> None:
    shown = {
        (page.parent / target.partition("#")[0]).resolve()
        for page, found in shown_images().items()
        for _, target in found
    }
    assets = {p.resolve() for p in ASSETS.rglob("*") if p.is_file()} if ASSETS.is_dir() else set()
    orphans = sorted(str(p.relative_to(ROOT)) for p in assets - shown)
    assert not orphans, f"files in docs/assets/ that no page shows: {orphans}"


def test_the_picture_check_sees_alt_text_and_targets() -> None:
    text = (
        '![A report\npage](../assets/a.png) and ![](b.png "title")\n'
        "```\n![in code](c.png)\n```\nsyntax: `![alt](f.png)`\n"
        "<img src=\"d.png\" alt=\"D\"> <img alt='' src='e.png'>\n"
    )
    assert images(text) == [
        ("A report page", "../assets/a.png"),
        ("", "b.png"),
        ("D", "d.png"),
        ("", "e.png"),
    ]
    assert any(
        target.startswith("../assets/") for found in shown_images().values() for _, target in found
    )


MKDOCS = pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None, reason="no mkdocs")


def build(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """`mkdocs build --strict` of the manual under `root` into `site`."""
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )


@MKDOCS
def test_the_manual_builds_strictly(tmp_path: Path) -> None:
    result = build(ROOT, tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "site" / "reference" / "params.html").is_file()


@MKDOCS
def test_the_strict_build_fails_on_an_unlisted_page_and_a_broken_anchor(tmp_path: Path) -> None:
    shutil.copy(ROOT / "mkdocs.yml", tmp_path)
    shutil.copytree(DOCS, tmp_path / "docs")
    (tmp_path / "docs" / "orphan.md").write_text("# Orphan\n\nIn no navigation.\n")
    index = tmp_path / "docs" / "index.md"
    index.write_text(index.read_text() + "\n[gone](reference/params.md#no-such-heading)\n")
    result = build(tmp_path, tmp_path / "site")
    assert result.returncode != 0
    assert "orphan.md" in result.stderr and "no-such-heading" in result.stderr
