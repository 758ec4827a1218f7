"""The MLflow UI, in headless Chromium, on a server started as the README says.

A tiny train + evaluate logs to that server over HTTP; the browser then opens the run page and
must show the run's params and test metrics, preview an overlay figure from the Artifacts tab,
and list the fold's run under the cross-validation's parent run once the parent is expanded.
Screenshots of each step go to `$COVIDSEG_TEST_ARTIFACTS/mlflow-ui/` (default
`<repo>/test-artifacts/`). The same server must refuse requests naming a foreign Host (DNS
rebinding) and cross-origin writes.

Needs Chromium (`apt-get install chromium`) and Playwright (requirements.txt); without them the
browser test skips, or fails under CI (`CI=true`).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn
from urllib.parse import unquote

import pytest
import requests
from mlflow import MlflowClient
from mlflow_server import CHROMIUM_ARGS, ROOT, WAIT_MS, MlflowServer
from tiny import TINY, merge

from covidseg.config import Params
from covidseg.data.splits import load_splits
from covidseg.evaluation.evaluate import EvalPaths, evaluate
from covidseg.training.train import TrainPaths, train

if TYPE_CHECKING:
    from mlflow.entities import Run
    from playwright.sync_api import Locator, Page

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("mlflow-ui")]

PARAMS = Params.model_validate(merge(TINY, {"train": {"epochs": 1, "steps_per_epoch": 2}}))
# The bytes behind an <img>'s (blob:) source, hashed in the page: what the preview shows.
SHA256_OF_IMAGE_SOURCE = """async img => {
    const data = await (await fetch(img.src)).arrayBuffer();
    const digest = new Uint8Array(await crypto.subtle.digest("SHA-256", data));
    return Array.from(digest, b => b.toString(16).padStart(2, "0")).join("");
}"""
CLIENT_ENV = (  # settings a developer's shell may hold; undone after the test
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_RUN_ID",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "DVC_EXP_NAME",
    "DVC_EXP_BASELINE_REV",
)


def missing(what: str) -> NoReturn:
    """Fail under CI, where the browser test must run; skip on a developer's machine."""
    message = f"the MLflow UI test needs {what}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Debian's Chromium, with Playwright importable to drive it."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing("Playwright (pip install -r requirements.txt)")
    path = Path(os.environ.get("CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium")
    if not path.is_file():
        missing(f"Chromium at {path} (apt-get install chromium, or set CHROMIUM)")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    """The README's `mlflow server` line, sqlite store and artifacts in a temporary folder."""
    mlflow_server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield mlflow_server
    mlflow_server.stop()


@pytest.fixture
def screenshots() -> Path:
    """An emptied `mlflow-ui/` folder under the test-artifacts folder that CI keeps."""
    base = Path(os.environ.get("COVIDSEG_TEST_ARTIFACTS") or ROOT / "test-artifacts")
    folder = base / "mlflow-ui"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def row_value(page: Page, key: str) -> str:
    """The value cell of the table row whose first cell is exactly `key` (scrolled into view)."""
    from playwright.sync_api import expect

    row = page.get_by_role("row").filter(has=page.get_by_role("cell", name=key, exact=True))
    expect(row).to_have_count(1, timeout=WAIT_MS)
    row.scroll_into_view_if_needed()
    return row.get_by_role("cell").nth(1).inner_text().strip()


def tree_node(page: Page, name: str) -> Locator:
    """An entry of the Artifacts tab's file tree."""
    return page.locator(f'[data-testid="artifact-tree-node"][artifact-name="{name}"]')


def close_assistant(page: Page) -> None:
    """Close the assistant's side panel, which would squeeze the screenshots."""
    close = page.locator('[data-component-id$="assistant.chat_panel.close"]')
    if close.count():
        close.first.click()


def run_row(page: Page, run: Run) -> Locator:
    """The runs list's row of `run`: the grid part that holds its name (ag-grid splits a row
    into pinned and scrolling parts that share the `row-id`)."""
    link = page.get_by_role("link", name=run.info.run_name, exact=True)
    return page.locator(f'[role="row"][row-id="{run.info.run_id}"]').filter(has=link)


def fit_run_name_column(page: Page, runs: list[Run]) -> None:
    """Size the Run Name column to its longest name (a double click on its edge) and check
    that the names of `runs` show whole; focus and hover then leave the table."""
    header = page.locator('.ag-header-cell[col-id="attributes.`Run Name`"]')
    header.locator(".ag-header-cell-resize").dblclick()
    page.mouse.move(0, 0)
    page.evaluate("document.activeElement instanceof HTMLElement && document.activeElement.blur()")
    for run in runs:
        name = page.get_by_role("link", name=run.info.run_name, exact=True).locator("span")
        shown, full = name.evaluate("e => [e.clientWidth, e.scrollWidth]")
        assert shown >= full, f"{run.info.run_name!r} cut short: {shown} of {full} px"


def expand_parent_run(page: Page, url: str, parent: Run, children: list[Run]) -> None:
    """Open the runs list of the parent's experiment, expand the parent and check that each
    child run is listed right under it, indented."""
    from playwright.sync_api import expect

    page.goto(f"{url}/#/experiments/{parent.info.experiment_id}/runs", timeout=WAIT_MS)
    parent_row = run_row(page, parent)
    expect(parent_row).to_be_visible(timeout=WAIT_MS)
    close_assistant(page)
    for child in children:  # nested runs start collapsed: listed only under their parent
        expect(run_row(page, child)).to_have_count(0)
    name_cell = parent_row.get_by_role("gridcell").filter(
        has=page.get_by_role("link", name=parent.info.run_name, exact=True)
    )
    name_cell.get_by_role("button").click()  # the expander beside the parent's name
    fit_run_name_column(page, [parent, *children])
    parent_index = int(parent_row.get_attribute("row-index") or "-1")
    parent_link = parent_row.get_by_role("link", name=parent.info.run_name, exact=True)
    parent_box = parent_link.bounding_box()
    assert parent_box is not None
    child_indices = []
    for child in children:
        row = run_row(page, child)
        expect(row).to_be_visible()
        child_indices.append(int(row.get_attribute("row-index") or "-1"))
        box = row.get_by_role("link", name=child.info.run_name, exact=True).bounding_box()
        assert box is not None
        assert box["y"] > parent_box["y"] and box["x"] > parent_box["x"] + 8, (box, parent_box)
    expected = range(parent_index + 1, parent_index + 1 + len(children))
    assert sorted(child_indices) == list(expected), (parent_index, child_indices)


def run_tiny_pipeline(
    url: str, prepared: tuple[Path, Path], raw_dir: Path, out: Path, monkeypatch: pytest.MonkeyPatch
) -> dict:
    """Train and evaluate against the server at `url`; evaluate's summary."""
    for name in CLIENT_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.chdir(out)  # evaluate logs ./params.yaml when there is one; here there is not
    data_dir, splits = prepared
    train(
        PARAMS,
        TrainPaths(
            data_dir=data_dir,
            splits=splits,
            model_dir=out / "model",
            checkpoint_dir=out / "checkpoints",
            metrics=out / "train.json",
            log=out / "train_log.csv",
        ),
    )
    return evaluate(
        PARAMS,
        EvalPaths(
            data_dir=data_dir,
            raw_dir=raw_dir,
            splits=splits,
            model_dir=out / "model",
            metrics=out / "evaluate.json",
            per_case=out / "per_case.csv",
            reports=out / "reports",
            train_log=out / "train_log.csv",
        ),
    )


def test_run_page_shows_params_metrics_and_overlay(
    chromium: Path,
    server: MlflowServer,
    prepared: tuple[Path, Path],
    raw_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    screenshots: Path,
) -> None:
    from playwright.sync_api import expect, sync_playwright

    out = tmp_path / "run"
    out.mkdir()
    summary = run_tiny_pipeline(server.url, prepared, raw_dir, out, monkeypatch)

    client = MlflowClient(server.url)
    experiment = client.get_experiment_by_name(PARAMS.tracking.experiment)
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    (run,) = [r for r in runs if r.data.tags.get("covidseg.fold") == "0"]  # the fold's run
    (parent,) = [r for r in runs if r is not run]
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id  # nested in the CV's run
    exp_id, run_id = experiment.experiment_id, run.info.run_id
    assert run.data.metrics["dice"] == pytest.approx(summary["dice"])
    case = load_splits(prepared[1], 0)["test"][0]
    overlay = out / "reports" / "overlays" / f"{case}.png"
    artifact = f"evaluation/overlays/{case}.png"
    assert artifact in [a.path for a in client.list_artifacts(run_id, "evaluation/overlays")]

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(chromium), args=CHROMIUM_ARGS, headless=True
        )
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(WAIT_MS)
        try:
            page.goto(f"{server.url}/#/experiments/{exp_id}/runs/{run_id}", timeout=WAIT_MS)
            expect(page.get_by_text(run_id, exact=True)).to_be_visible(timeout=WAIT_MS)
            expect(page.get_by_role("tab", name="Overview")).to_have_attribute(
                "aria-selected", "true"
            )
            close_assistant(page)
            page.screenshot(path=screenshots / "01-run-overview.png")

            assert row_value(page, "train.epochs") == "1"
            assert row_value(page, "arch") == "Unet"
            assert row_value(page, "encoder") == PARAMS.encoder == "mobilenet_v2"  # in view
            page.screenshot(path=screenshots / "02-params.png")

            shown = row_value(page, "dice")
            assert float(shown) == pytest.approx(summary["dice"], rel=1e-9), shown
            page.screenshot(path=screenshots / "03-metrics.png")

            page.get_by_role("tab", name="Artifacts").click()
            tree_node(page, "evaluation").click()
            tree_node(page, "overlays").click()
            with page.expect_response(
                lambda r: r.url.startswith(server.url) and artifact in unquote(r.url),
                timeout=WAIT_MS,
            ) as served:
                tree_node(page, f"{case}.png").click()
            assert served.value.status == 200
            expect(page.get_by_text(artifact, exact=True)).to_be_visible()
            image = page.locator("img[src^='blob:']").first
            expect(image).to_be_visible()
            page.wait_for_function(
                "img => img.complete && img.naturalWidth > 0", arg=image.element_handle()
            )
            natural = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
            assert tuple(natural) == png_size(overlay)
            shown_digest = image.evaluate(SHA256_OF_IMAGE_SOURCE)
            assert shown_digest == hashlib.sha256(overlay.read_bytes()).hexdigest()
            page.screenshot(path=screenshots / "04-artifacts-overlay.png")

            expand_parent_run(page, server.url, parent, [run])
            page.screenshot(path=screenshots / "05-runs-parent-child.png")
        except Exception:
            page.screenshot(path=screenshots / "failure.png")
            raise
        finally:
            browser.close()


def test_readme_server_refuses_foreign_host_headers(server: MlflowServer) -> None:
    """DNS rebinding: a page on evil.example.com resolving to 127.0.0.1 must get nothing."""
    command = server.command
    assert command[command.index("--host") + 1] == "127.0.0.1"  # loopback only, as documented
    port = server.port
    api = "/api/2.0/mlflow/experiments/search?max_results=5"
    for path in ("/", api):
        for host in ("evil.example.com", f"evil.example.com:{port}"):
            refused = requests.get(server.url + path, headers={"Host": host}, timeout=30)
            assert refused.status_code == 403, (path, host, refused.status_code)
            assert "Invalid Host header" in refused.text
            assert "experiments" not in refused.text
        for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
            served = requests.get(server.url + path, headers={"Host": host}, timeout=30)
            assert served.status_code == 200, (path, host, served.status_code)
    listed = requests.get(server.url + api, timeout=30)  # no Host given: the URL's
    assert "experiments" in listed.json()


def test_readme_server_refuses_cross_origin_writes(server: MlflowServer) -> None:
    """A page on another origin cannot create things through the user's browser."""
    create = f"{server.url}/api/2.0/mlflow/experiments/create"
    refused = requests.post(
        create,
        json={"name": "from-evil"},
        headers={"Origin": "http://evil.example.com"},
        timeout=30,
    )
    assert refused.status_code == 403, refused.status_code
    client = MlflowClient(server.url)
    assert client.get_experiment_by_name("from-evil") is None
    allowed = requests.post(
        create, json={"name": "from-ui"}, headers={"Origin": server.url}, timeout=30
    )
    assert allowed.status_code == 200, allowed.text
    assert client.get_experiment_by_name("from-ui") is not None
