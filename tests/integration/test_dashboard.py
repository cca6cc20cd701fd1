"""The web dashboard (/ui) in headless Chromium against real ``flashtune serve`` and ``flashtune worker`` processes.

Debian's Chromium (/usr/bin/chromium, installed by .ci/run) driven by Playwright for Python; Playwright's own
browser downloads are never used. The API runs with a key, so the page has to ask for it and send it. Screenshots
go to test-artifacts/ (git-ignored). Any uncaught page error or Content-Security-Policy violation fails a test.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ROOT, Service, make_service

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
KEY = "dashboard-key-0123456789"
LABELS = ["bearish", "neutral", "bullish"]  # the order of the probability bars
AUTH = {"Authorization": f"Bearer {KEY}"}

if not os.environ.get("CI"):  # CI installs both (.ci/run, the dev extras): there a missing one fails the tests
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (apt-get install chromium)", allow_module_level=True)
    pytest.importorskip("playwright.sync_api", reason="pip install -e '.[dev]'")
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright  # noqa: E402


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, builtin_model_cache: Path) -> Iterator[Service]:
    service = make_service(tmp_path_factory.mktemp("dashboard"), builtin_model_cache, env={"FLASHTUNE_API_KEY": KEY})
    service.client.headers.update(AUTH)
    yield service
    service.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM))
        yield chromium
        chromium.close()


class Problems:
    """Uncaught errors and CSP violations seen by a page."""

    def __init__(self, page: Page) -> None:
        self.items: list[str] = []
        page.on("pageerror", lambda error: self.items.append(f"page error: {error}"))
        page.on("console", self._console)

    def _console(self, message: ConsoleMessage) -> None:
        text = message.text
        if "Content Security Policy" in text or "Refused to" in text:
            self.items.append(f"CSP: {text}")


@pytest.fixture
def page(browser: Browser) -> Iterator[tuple[Page, Problems]]:
    context = browser.new_context(viewport={"width": 1366, "height": 900}, accept_downloads=True)
    tab = context.new_page()
    tab.set_default_timeout(30_000)
    problems = Problems(tab)
    yield tab, problems
    context.close()
    assert not problems.items, problems.items


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"dashboard-{name}.png"), full_page=True)


def enter_key(page: Page, url: str) -> None:
    page.goto(url + "/")  # redirected to /ui/
    assert page.url == f"{url}/ui/"
    expect(page.locator("#key-panel")).to_be_visible()  # GET /jobs answered 401: the page asks for the key
    page.get_by_label("API key", exact=True).fill(KEY)
    page.get_by_role("button", name="Use this key").click()
    expect(page.locator("#key-panel")).to_be_hidden()
    expect(page.locator("#key-state")).to_have_text("API key: set for this tab")


def wait_until(page: Page, read: Callable[[], Any], done: Callable[[Any], bool], seconds: float, what: str) -> Any:
    """Poll from Python: page.wait_for_function evaluates strings with eval, which the page's CSP forbids."""
    deadline = time.monotonic() + seconds
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; last value {value!r}")
        page.wait_for_timeout(250)


def progress_value(page: Page, selector: str) -> float:
    return float(page.locator(selector).get_attribute("value") or 0)  # <progress> reflects .value in the attribute


def wait_progress_advances(page: Page, selector: str, seconds: float) -> tuple[float, float]:
    """Two readings of a <progress>, the second larger: the bar follows the job live."""
    first = wait_until(page, lambda: progress_value(page, selector), lambda v: v > 0, seconds, "progress")
    second = wait_until(page, lambda: progress_value(page, selector), lambda v: v > first, seconds, "more progress")
    return first, second


def chart_points(page: Page) -> int:
    path = page.locator("#loss-train-path")
    return int(path.get_attribute("data-points") or 0) if path.count() else 0


# ------------------------------------------------------------------------------------------------------ tests
def test_static_files_headers_and_key(svc: Service) -> None:
    bare = httpx.Client(base_url=svc.url, timeout=30)
    root = bare.get("/", follow_redirects=False)
    assert root.status_code in (302, 307) and root.headers["location"] == "/ui/"
    index = bare.get("/ui/")  # the files need no key: they hold no data
    assert index.status_code == 200 and index.headers["content-type"].startswith("text/html")
    csp = index.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "style-src 'self'" in csp and "unsafe-inline" not in csp
    assert index.headers["x-content-type-options"] == "nosniff"
    assert "<script" in index.text and not re.search(r"<script(?![^>]*\bsrc=)", index.text)  # no inline script
    assert not re.search(r"\sstyle=", index.text) and "<style" not in index.text  # no inline style
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        response = bare.get(f"/ui/static/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind), name
    for bad in ("/ui/static/..%2Fapi%2Fmain.py", "/ui/static/.hidden.js", "/ui/static/missing.js", "/ui/static/x.py"):
        assert bare.get(bad).status_code == 404, bad
    assert bare.get("/ui/defaults").status_code == 401  # what the page reads is behind the key
    defaults = bare.get("/ui/defaults", headers=AUTH).json()
    assert defaults["base_model"] == "builtin" and defaults["hyperparameters"]["epochs"] == 4
    assert "micro_batch_size" not in defaults["hyperparameters"]
    assert "/ui/" not in bare.get("/openapi.json", headers=AUTH).json()["paths"]
    bare.close()


def test_wheel_ships_the_dashboard(tmp_path: Path) -> None:
    """A non-editable install has the files: they are package data of the wheel."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for package in ("service", "workers"):
        shutil.copytree(ROOT / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
    try:
        import setuptools

        recent = int(setuptools.__version__.split(".")[0]) >= 68  # pyproject's build requirement
    except ImportError:
        recent = False
    flags = ["--no-build-isolation"] if recent else []  # else pip's isolated build fetches setuptools from PyPI
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *flags, "-q", "-w", str(tmp_path / "dist"), str(source)],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("flashtune-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for static in sorted((ROOT / "service" / "static").iterdir()):
        assert f"service/static/{static.name}" in names, static.name


@pytest.mark.slow
def test_dashboard_follows_a_job_from_the_form_to_its_adapter(svc: Service, page: tuple[Page, Problems]) -> None:
    tab, _ = page
    enter_key(tab, svc.url)
    expect(tab.locator("#jobs-empty")).to_be_visible()

    # Start a job from the form: the defaults of the built-in model are shown; epochs and a name are set.
    tab.get_by_role("link", name="New job").click()
    epochs = tab.get_by_label("Epochs", exact=True)
    expect(epochs).to_have_attribute("placeholder", "4")
    expect(tab.get_by_label("Existing dataset")).to_have_value("builtin")
    epochs.fill("4")
    tab.get_by_label("Name (optional)").fill("from-the-ui")
    tab.get_by_role("button", name="Start job").click()
    tab.wait_for_url(re.compile(r".*#/jobs/\d+$"))
    job_id = int(tab.url.rsplit("/", 1)[1])
    job = svc.job(job_id)
    assert job["name"] == "from-the-ui" and job["hyperparameters"]["epochs"] == 4 and job["dataset"] == "builtin"

    # The jobs list: the running job's bar and figures advance without a reload.
    tab.get_by_role("link", name="Jobs", exact=True).click()
    row = tab.locator(f'tr[data-job-id="{job_id}"]')
    expect(row.locator(".status")).to_have_text("running", timeout=300_000)
    first, second = wait_progress_advances(tab, f'tr[data-job-id="{job_id}"] progress', 300)
    assert 0 < first < second <= 1
    expect(row.locator(".progress-text")).to_contain_text(re.compile(r"step \d+/\d+ · epoch [\d.]+/4 · loss"))
    expect(row.locator(".progress-text")).to_contain_text("tokens/s")
    expect(tab.locator("#jobs-summary")).to_have_text("1 running, 0 queued")
    shot(tab, "jobs-running")

    # The job page: live progress (aria-live), hyperparameters, events from the SSE stream, the loss chart.
    row.get_by_role("link").click()
    expect(tab.locator("#job-title")).to_have_text(f"Job #{job_id} from-the-ui")
    expect(tab.locator("#job-progress-text")).to_have_attribute("aria-live", "polite")
    wait_progress_advances(tab, "#job-bar", 300)
    expect(tab.locator("#job-hp")).to_contain_text("learning_rate")
    expect(tab.locator('#job-events li[data-type="started"]')).to_have_count(1)
    wait_until(tab, lambda: chart_points(tab), lambda n: n >= 3, 300, "three points in the loss chart")
    path = tab.locator("#loss-train-path").get_attribute("d") or ""
    assert path.startswith("M") and path.count("L") >= 2, path
    assert all(re.fullmatch(r"[ML][\d.]+,[\d.]+", part) for part in path.split()), path
    shot(tab, "job-running")

    # Cancel: a second job, queued behind the first, cancelled from its page (two clicks).
    other = svc.post_job(name="to-cancel")
    tab.goto(f"{svc.url}/ui/#/jobs/{other['id']}")
    cancel = tab.get_by_role("button", name="Cancel job")
    cancel.click()
    tab.get_by_role("button", name="Click again to cancel").click()
    expect(tab.locator("#job-status")).to_have_text("cancelled")
    expect(cancel).to_be_hidden()
    assert svc.job(other["id"])["status"] == "cancelled"

    # When the job has succeeded: evaluation figures (base vs adapter), the final chart, the adapter download.
    tab.goto(f"{svc.url}/ui/#/jobs/{job_id}")
    expect(tab.locator("#job-status")).to_have_text("succeeded", timeout=900_000)
    adapter = svc.job(job_id)["adapter"]
    expect(tab.locator("#eval-panel")).to_be_visible()
    metrics = svc.client.get(f"/adapters/{adapter}").json()["metrics"]
    accuracy = tab.locator('#eval-body tr[data-metric="accuracy"] td')
    expect(accuracy.nth(0)).to_have_text(f"{metrics['base']['accuracy'] * 100:.1f}%")
    expect(accuracy.nth(1)).to_have_text(f"{metrics['adapter']['accuracy'] * 100:.1f}%")
    expect(tab.locator("#eval-body table.confusion")).to_have_count(2)
    # the probability figures, and the reliability diagram beside the confusion matrices
    expect(tab.locator('#eval-body tr[data-metric="ece"] td').nth(1)).to_have_text(f"{metrics['adapter']['ece']:.3f}")
    expect(tab.locator(".confusions svg.reliability circle.rel-adapter").first).to_be_visible()
    expect(tab.locator('#job-events li[data-type="succeeded"]')).to_have_count(1)
    losses = metrics["losses"]
    wait_until(tab, lambda: chart_points(tab), lambda n: n == len(losses["step_loss"]), 30, "the whole loss history")
    assert tab.locator(".chart circle.eval-dot").count() == len([v for _, v in losses["eval_loss"] if v is not None])
    shot(tab, "job-succeeded")
    with tab.expect_download() as info:
        tab.get_by_role("link", name="Download adapter (.tar.gz)").click()
    assert info.value.suggested_filename == f"{adapter}.tar.gz"
    with tarfile.open(fileobj=io.BytesIO(Path(info.value.path()).read_bytes())) as archive:
        assert f"{adapter}/adapter_config.json" in archive.getnames()

    # The analyze playground: the adapter and the base side by side.
    tab.get_by_role("link", name="Analyze").click()
    tab.get_by_label("News text").fill("美联储宣布加息25个基点")
    tab.get_by_label("Adapter", exact=True).select_option(adapter)
    tab.get_by_label("Compare with").select_option("none")
    tab.get_by_label("Max new tokens").fill("24")
    tab.get_by_role("button", name="Analyze").click()
    cards = tab.locator("#analyze-results .result")
    expect(cards).to_have_count(2, timeout=120_000)
    tab.wait_for_timeout(600)  # the bars' width transition
    for i in range(2):
        label = cards.nth(i).locator(".label").get_attribute("data-label")
        assert label in LABELS
        shown = [float((cards.nth(i).locator(".pct").nth(j).text_content() or "").rstrip("%")) for j in range(3)]
        assert abs(sum(shown) - 100) < 1.5 and LABELS[shown.index(max(shown))] == label, (label, shown)
        bars = cards.nth(i).locator(".bar span")
        widths = [(bars.nth(j).bounding_box() or {"width": 0.0})["width"] for j in range(3)]
        assert widths[LABELS.index(label)] == max(widths) > 0, widths  # the bars are drawn, the label's the longest
    expect(cards.nth(0)).to_contain_text(f"Adapter {adapter}")
    expect(cards.nth(1)).to_contain_text("Base model")
    expect(cards.nth(0).locator(".analysis")).not_to_be_empty()
    shot(tab, "analyze")


def test_uploaded_dataset_is_offered_and_a_bad_job_is_explained(svc: Service, page: tuple[Page, Problems]) -> None:
    tab, _ = page
    enter_key(tab, svc.url)
    tab.get_by_role("link", name="New job").click()
    output = "这是一条3星级的财经快讯，属于中性消息。"
    data = "\n".join(json.dumps({"instruction": "分析", "input": f"新闻{i}", "output": output}) for i in range(12))
    tab.get_by_label("Dataset file (JSONL, CSV or SQLite)").set_input_files(
        files=[{"name": "tiny.jsonl", "mimeType": "application/jsonl", "buffer": data.encode()}]
    )
    tab.get_by_label("Epochs", exact=True).fill("1000")  # over the limit: the API's 422 is shown, no job starts
    tab.get_by_role("button", name="Start job").click()
    status = tab.locator("#new-status")
    expect(status).to_contain_text("Not started")
    expect(status).to_contain_text("hyperparameters.epochs")
    epochs = tab.get_by_label("Epochs", exact=True)  # the field at fault is marked, with the API's message beside it
    expect(epochs).to_have_attribute("aria-invalid", "true")
    expect(tab.locator("#hp-epochs-error")).to_contain_text("less than or equal to 100")
    expect(tab.locator('#new-form [aria-invalid="true"]')).to_have_count(1)
    tab.get_by_label("Promote to alias when better (optional)").fill("latest")  # reserved: refused, and marked
    epochs.fill("1")
    tab.get_by_role("button", name="Start job").click()
    expect(tab.get_by_label("Promote to alias when better (optional)")).to_have_attribute("aria-invalid", "true")
    expect(epochs).not_to_have_attribute("aria-invalid", "true")
    expect(tab.locator("#new-promote-error")).to_contain_text("reserved")
    datasets: list[dict[str, Any]] = svc.client.get("/datasets").json()
    uploaded = next(d for d in datasets if d["filename"] == "tiny.jsonl")
    tab.reload()
    expect(tab.get_by_label("Existing dataset").locator(f'option[value="{uploaded["id"]}"]')).to_have_count(1)
    shot(tab, "new-job")


def test_wrong_key_and_unknown_job_are_explained(svc: Service, page: tuple[Page, Problems]) -> None:
    tab, _ = page
    tab.goto(svc.url + "/ui/")
    tab.get_by_label("API key", exact=True).fill("not-the-key")
    tab.get_by_role("button", name="Use this key").click()
    expect(tab.locator("#key-reason")).to_contain_text("did not accept this key")  # asked again, saying why
    assert tab.evaluate("sessionStorage.getItem('flashtune.apiKey')") == "not-the-key"  # this tab only
    tab.get_by_label("API key", exact=True).fill(KEY)
    tab.get_by_role("button", name="Use this key").click()
    expect(tab.locator("#key-panel")).to_be_hidden()
    tab.goto(f"{svc.url}/ui/#/jobs/987654")
    expect(tab.locator("#notice")).to_have_text("job 987654 does not exist")
    tab.goto(f"{svc.url}/ui/#/nowhere")
    expect(tab.get_by_role("heading", name="Not found")).to_be_visible()


def one_step_dataset() -> bytes:
    """Four examples: with batch 4 and one epoch, a job of one optimizer step (one point of training loss)."""
    output = "这是一条3星级的财经快讯，属于中性消息。"
    return "\n".join(
        json.dumps({"instruction": "分析", "input": f"快讯{i}", "output": output}) for i in range(4)
    ).encode()


@pytest.mark.slow
def test_one_step_chart_aliases_and_promotion(svc: Service, page: tuple[Page, Problems]) -> None:
    """A job of one step draws its one loss point; its adapter is promoted to an alias from the job page, set and
    removed on the adapters page, and the Agent's alias answers on the analyze page with metadata and context."""
    tab, _ = page
    upload = svc.client.post("/datasets", files={"file": ("four.jsonl", io.BytesIO(one_step_dataset()))})
    assert upload.status_code == 201, upload.text
    hyperparameters = {"epochs": 1, "batch_size": 4, "validation_fraction": 0}
    job = svc.wait(svc.post_job(dataset=upload.json()["id"], hyperparameters=hyperparameters, name="one-step")["id"])
    assert job["status"] == "succeeded" and job["progress"]["total_steps"] == 1, job
    adapter = job["adapter"]
    enter_key(tab, svc.url)

    # The one-point chart: a dot where the path of one point draws nothing; events show rounded numbers.
    tab.goto(f"{svc.url}/ui/#/jobs/{job['id']}")
    expect(tab.locator("#job-status")).to_have_text("succeeded")
    wait_until(tab, lambda: chart_points(tab), lambda n: n == 1, 60, "the one loss point")
    dot = tab.locator("#loss-train-dot")
    expect(dot).to_have_count(1)
    box = dot.bounding_box()
    assert box is not None and box["width"] > 0 and box["height"] > 0, box
    expect(tab.locator('#job-events li[data-type="succeeded"]')).to_have_count(1)
    messages = tab.locator("#job-events .message").all_text_contents()
    assert messages and not any(re.search(r"\d\.\d{6,}|\bNone\b", m) for m in messages), messages

    # Promote from the job page: production now serves this adapter.
    expect(tab.locator("#promotion-state")).to_contain_text("No alias points at this adapter")
    expect(tab.get_by_label("Alias to promote to")).to_have_value("production")
    tab.get_by_role("button", name="Promote to alias").click()
    expect(tab.locator("#promote-status")).to_have_text(f"production now serves {adapter}")
    expect(tab.locator("#promotion-state")).to_contain_text("Serves as: production")
    assert svc.client.get("/aliases/production").json()["adapter"] == adapter
    tab.get_by_label("Alias to promote to").fill("job-5")  # an adapter's own name cannot be an alias: marked
    tab.get_by_role("button", name="Promote to alias").click()
    expect(tab.get_by_label("Alias to promote to")).to_have_attribute("aria-invalid", "true")
    expect(tab.locator("#promote-status")).to_contain_text("Not promoted")
    shot(tab, "job-promoted")

    # The adapters page: the alias table, a second alias set from the form and removed again.
    tab.get_by_role("link", name="Adapters").click()
    expect(tab.locator('#aliases-body tr[data-alias="production"] .alias-adapter')).to_have_text(adapter)
    expect(tab.locator(f'#adapters-body tr[data-adapter="{adapter}"] .aliases')).to_have_text("production")
    tab.get_by_label("Alias name").fill("staging")
    tab.get_by_label("Adapter it serves").select_option(adapter)
    tab.get_by_role("button", name="Set alias").click()
    expect(tab.locator("#alias-status")).to_have_text(f"staging now serves {adapter}")
    expect(tab.locator("#aliases-body tr")).to_have_count(2)
    shot(tab, "aliases")
    tab.get_by_role("button", name="Remove alias staging").click()
    expect(tab.locator("#aliases-body tr")).to_have_count(1)
    assert [a["alias"] for a in svc.client.get("/aliases").json()] == ["production"]

    # Analyze through the alias, with metadata and market context.
    tab.get_by_role("link", name="Analyze").click()
    tab.get_by_label("News text").fill("美国至12月13日当周初请失业金人数")
    tab.get_by_label("Adapter", exact=True).select_option("production")
    tab.get_by_label("Compare with").select_option("")
    tab.get_by_label("Max new tokens").fill("0")
    tab.get_by_text("Metadata and market context (optional)").click()
    tab.get_by_label("Country").fill("美国")
    tab.get_by_label("Actual").fill("22.4")
    tab.get_by_label("Return before the event").fill("-0.0012")
    tab.get_by_label("Trend").select_option("down")
    tab.get_by_role("button", name="Analyze").click()
    card = tab.locator("#analyze-results .result")
    expect(card).to_have_count(1, timeout=120_000)
    expect(card.locator("h3")).to_contain_text(f"Adapter {adapter} via production")
    used = (card.locator(".context-used").text_content() or "") + (
        card.locator(".context-ignored").text_content() or ""
    )
    for field in ("country", "actual", "pre_ret", "trend"):
        assert field in used, used
    shot(tab, "analyze-alias")
    tab.get_by_label("Return before the event").fill("5")  # out of range: the API's 422 marks the field
    tab.get_by_role("button", name="Analyze").click()
    expect(tab.get_by_label("Return before the event")).to_have_attribute("aria-invalid", "true")


def test_open_server_needs_no_key(tmp_path: Path, builtin_model_cache: Path, page: tuple[Page, Problems]) -> None:
    """Without FLASHTUNE_API_KEY the page never claims a key is missing: it says none is needed."""
    tab, _ = page
    open_api = make_service(tmp_path, builtin_model_cache, workers=0)
    try:
        tab.goto(open_api.url + "/ui/")
        expect(tab.locator("#jobs-empty")).to_be_visible()
        expect(tab.locator("#key-state")).to_have_text("Open server: no API key needed")
        expect(tab.locator("#key-change")).to_be_hidden()
        expect(tab.locator("#key-panel")).to_be_hidden()
        assert "not set" not in (tab.locator("header").text_content() or "")
    finally:
        open_api.stop()
