"""`tunelab ui` end to end in headless Chromium (the Debian package) driven by Playwright: the real `tunelab ui`
command on a loopback port over a workspace of generated data, tiny models from conftest read through --root.

A run is made from the form (the YAML follows each field, validation errors sit beside their field, the advise
panel estimates it), its curves fill in from the live stream and its status becomes finished, its metrics show;
it is compared with a run trained outside the UI, and its classifier answers in the playground. A long run typed
as YAML (the form follows the YAML) is watched growing, stopped (interrupted, resumable), resumed and stopped
again. A chat run streams replies from the tuned and the base model side by side. The server has a token, so every
request of the page is seen to carry the cookie its link sets (without it: 401). On every page: no console
error, no failed request, no HTTP error the test did not provoke, every form control labelled, a screenshot that
is not blank. With TUNELAB_UI_SCREENSHOTS=1 the screenshots go to docs/images/ui-*.png (the docs' pictures)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import make_chat_rows, make_rows, write_jsonl
from PIL import Image
from test_report import CHROMIUM_FLAGS, _blank, chromium  # noqa: F401 - chromium: the fixture that skips

import tunelab
from tunelab.ui import jobs

pytestmark = pytest.mark.browser

DOCS_IMAGES = Path(__file__).resolve().parents[1] / "docs" / "images"
DOC_PAGES = {"runs", "run", "new", "compare", "playground"}  # the screenshots docs/ui.md shows
RUN_TIMEOUT_MS = 240_000  # a subprocess that imports torch and trains a tiny model, on a busy 2-core machine
STEP_TIMEOUT_MS = 30_000

# Every form control has a label: a <label for>, a wrapping label, aria-label or aria-labelledby.
UNLABELLED = """() => [...document.querySelectorAll("input, select, textarea")]
  .filter(e => e.type !== "hidden" && !(e.labels && e.labels.length) && !e.getAttribute("aria-label")
               && !e.getAttribute("aria-labelledby"))
  .map(e => e.id || e.name || e.outerHTML.slice(0, 80))"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_bert, tiny_chat_llama) -> Path:
    """Data files, a run trained from Python (not through the UI: it must show up all the same) and a tiny chat run."""
    ws = tmp_path_factory.mktemp("ui-workspace")
    data = ws / "data"
    data.mkdir()
    write_jsonl(data / "train.jsonl", make_rows(200, seed=0))
    write_jsonl(data / "test.jsonl", make_rows(40, seed=99))
    write_jsonl(data / "chat.jsonl", make_chat_rows(96, seed=3))
    quick = ["eval.forgetting=none", "eval.samples=2", "eval.linear_probe=false"]
    tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={data / 'train.jsonl'}",
                         f"data.test={data / 'test.jsonl'}", "method.name=full", "train.max_steps=12",
                         "train.lr=1e-3", *quick, f"output_dir={ws / 'runs' / 'cli-full'}"])
    tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={data / 'chat.jsonl'}", "task.type=sft",
                         "data.max_length=64", "data.dedupe=false", "train.batch_size=8", "train.lr=1e-2", "method.name=lora",
                         "method.target_modules=all-linear", "train.max_steps=24", "eval.base=false", *quick,
                         f"output_dir={ws / 'runs' / 'chat-lora'}"])
    pairs = write_jsonl(data / "pairs.jsonl", [{"anchor": r["text"], "positive": r["text"]} for r in make_rows(24)])
    tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={pairs}", "task.type=embedding", "method.name=lora",
                         "train.max_steps=2", "eval.base=false", *quick, f"output_dir={ws / 'runs' / 'emb-lora'}"])
    return ws


TOKEN = "s3cret-ui-token"


@pytest.fixture(scope="module")
def ui(workspace, tiny_bert, tiny_chat_llama):
    """`tunelab ui` itself, as a user starts it, on a free loopback port, with a token (so that every fetch, event
    stream and streamed chat of the page is seen to carry the cookie the printed link sets); its base URL."""
    port = free_port()
    log = workspace.parent / "ui.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "tunelab", "ui", "--workspace", str(workspace),
                                   "--root", str(tiny_bert.parent), "--root", str(tiny_chat_llama.parent),
                                   "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL,
                                  env={**os.environ, "OMP_NUM_THREADS": "1", "TUNELAB_UI_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            ask = urllib.request.Request(url + "api/runs", headers={"Authorization": f"Bearer {TOKEN}"})
            urllib.request.urlopen(ask, timeout=5).read()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"tunelab ui did not start (exit {server.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
    yield url
    server.terminate()
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()
    # The runs it started outlive it by design: a test that failed half-way leaves none of them training.
    ui_jobs = jobs.Jobs(workspace)
    for out in ui_jobs.launched():
        if ui_jobs.alive(out):
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.killpg(ui_jobs.record(out)["pid"], signal.SIGKILL)


@pytest.fixture(scope="module")
def browser(chromium):  # noqa: F811 - the fixture imported from test_report
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        flags = [f for f in CHROMIUM_FLAGS if f != "--headless"]  # Playwright adds its own headless switch
        b = p.chromium.launch(executable_path=chromium, args=flags)
        yield b
        b.close()


class Watched:
    """A page whose console errors, uncaught exceptions, failed requests and HTTP errors are collected; `check`
    asserts there were none (bar those the test provoked), that every control is labelled, and takes a
    screenshot that must not be blank."""

    def __init__(self, page, url: str, shots: Path, docs: Path | None):
        self.page, self.url, self.shots, self.docs = page, url, shots, docs
        self.problems: list[str] = []
        self.provoked: list[tuple[str, int]] = []  # (URL part, status) of HTTP errors the test asked for
        page.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text} {m.location}"))
        page.on("pageerror", lambda e: self.problems.append(f"uncaught: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(f"failed: {r.method} {r.url} {r.failure}"))
        page.on("response", self._response)

    def _response(self, response) -> None:
        if response.status >= 400:
            for part, status in self.provoked:
                if part in response.url and status == response.status:
                    return
            self.problems.append(f"HTTP {response.status}: {response.request.method} {response.url}")

    def open(self, route: str) -> None:
        self.provoked.clear()
        self.page.goto(self.url + route)
        self.page.wait_for_selector("main h1")

    def check(self, name: str, height: int = 900) -> Image.Image:
        unlabelled = self.page.evaluate(UNLABELLED)
        assert unlabelled == [], f"{name}: form controls without a label: {unlabelled}"
        path = (self.docs if self.docs and name in DOC_PAGES else self.shots) / f"ui-{name}.png"
        self.page.evaluate("window.scrollTo(0, 0)")
        self.page.screenshot(path=str(path), full_page=height > 900, clip={"x": 0, "y": 0, "width": 1280, "height": height})
        image = Image.open(path).convert("RGB")
        assert not _blank(image), f"{name}: the page renders blank"
        # The console's "Failed to load resource" line for a provoked HTTP error is the browser's, not the page's.
        provoked = [f"console: Failed to load resource: the server responded with a status of {status} "
                    for _, status in self.provoked]
        problems = [p for p in self.problems if not any(p.startswith(line) for line in provoked)]
        assert problems == [], f"{name}: {problems}"
        self.problems.clear()
        return image


@pytest.fixture
def watched(browser, ui, tmp_path):
    docs = DOCS_IMAGES if os.environ.get("TUNELAB_UI_SCREENSHOTS") == "1" else None
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    page.goto(f"{ui}?token={TOKEN}")  # the link `tunelab ui` prints: it sets the cookie and drops the token
    assert page.url == ui + "#/runs"
    yield Watched(page, ui, tmp_path, docs)
    context.close()


def points(page, chart: str) -> int:
    return int(page.get_attribute(f"#{chart}", "data-points") or 0)


def wait_points_above(page, chart: str, n: int, timeout: int = RUN_TIMEOUT_MS) -> int:
    page.wait_for_function(f"Number(document.querySelector('#{chart}')?.dataset.points) > {n}", timeout=timeout)
    return points(page, chart)


def wait_status(page, status: str, timeout: int = RUN_TIMEOUT_MS) -> None:
    try:
        page.wait_for_function(f"document.querySelector('#run-status')?.textContent === {status!r}", timeout=timeout)
    except Exception:
        log = page.locator("pre.log").all_inner_texts()
        raise AssertionError(f"status stayed {page.inner_text('#run-status')!r}, not {status!r}; log: {log}") from None


def test_a_run_from_the_form_trains_compares_and_predicts(watched, workspace, tiny_bert):
    page = watched.page
    watched.open("#/new")
    # The starter recipe has no model: the server's error sits beside model.path.
    page.wait_for_function("document.querySelector('#err-f-model-path').textContent.includes('model.path')")
    page.fill("#f-model-path", str(tiny_bert))
    page.click("button[aria-label='Browse for data.train']")  # the file picker: the workspace's folders
    page.click("dialog.picker button:has-text('data')")
    page.click("dialog.picker button:has-text('train.jsonl')")
    assert page.input_value("#f-data-train") == "data/train.jsonl" and not page.is_visible("dialog.picker")
    page.fill("#f-data-test", "data/test.jsonl")
    page.click("details[data-section='train'] > summary")
    page.fill("#f-train-max_steps", "40")
    page.fill("#f-train-eval_every", "10")
    page.fill("#f-train-lr", "0.003")
    page.fill("#f-output_dir", "runs/form-lora")
    yaml_text = page.input_value("#recipe-yaml")
    assert f"path: {tiny_bert}" in yaml_text and "max_steps: 40" in yaml_text and "eval_every: 10" in yaml_text
    assert "output_dir: runs/form-lora" in yaml_text
    page.wait_for_function("document.querySelector('#check-state').textContent === 'The recipe is valid.'")
    assert page.inner_text("#err-f-model-path") == ""
    page.wait_for_selector("#advise table", timeout=RUN_TIMEOUT_MS)  # estimated once the recipe is valid
    assert "lora" in page.inner_text("#advise table")
    watched.check("new", height=1500)  # down to the estimates

    page.click("#launch")
    page.wait_for_function("location.hash === '#/run/runs/form-lora'")
    wait_points_above(page, "chart-loss", 0)
    wait_status(page, "finished")
    page.wait_for_selector("main[data-ended='true']")
    assert points(page, "chart-loss") >= 4 and points(page, "chart-lr") >= 4  # a train record every 10 of 40 steps
    assert points(page, "chart-metric") >= 4  # an evaluation every 10 steps
    results = page.inner_text("table.results")
    assert "tuned" in results and "accuracy" in results and "test" in results
    assert "accuracy" in page.inner_text(".headline")
    assert page.is_visible("#open-playground") and page.is_visible("#recipe-download")
    page.wait_for_selector("iframe.report")
    watched.check("run", height=1900)  # down to the results
    assert page.input_value("#export-format") == "peft" and not page.is_visible("#export-quant")  # GGUF's only
    page.click("#export")
    page.wait_for_selector("#export-done", timeout=RUN_TIMEOUT_MS)
    assert page.inner_text("#export-done") == "Exported to exports/form-lora-peft."
    assert (workspace / "exports" / "form-lora-peft" / "adapter_config.json").is_file()
    watched.check("run-exported")

    watched.open("#/runs")
    rows = page.locator("table.runs tbody tr")
    page.wait_for_function("document.querySelectorAll('table.runs tbody tr').length >= 4")
    listed = {r.get_attribute("data-run") for r in rows.all()}
    assert {"runs/form-lora", "runs/cli-full", "runs/chat-lora", "runs/emb-lora"} <= listed  # trained outside the UI too
    assert page.inner_text("tr[data-run='runs/form-lora'] .badge") == "finished"
    watched.check("runs", height=480)
    page.fill("#runs-filter", "cli-")
    assert [r.get_attribute("data-run") for r in rows.all()] == ["runs/cli-full"]
    page.fill("#runs-filter", "")
    page.get_by_role("button", name="Run", exact=True).click()  # sort by id, ascending
    ids = [r.get_attribute("data-run") for r in rows.all()]
    assert ids == sorted(ids)
    page.get_by_role("button", name="Run", exact=True).focus()  # and from the keyboard: again reverses it
    page.keyboard.press("Enter")
    assert [r.get_attribute("data-run") for r in rows.all()] == ids[::-1]
    assert page.get_attribute("th:has(button:focus)", "aria-sort") == "descending"

    watched.open("#/compare")
    page.check("input[value='runs/form-lora']")
    page.check("input[value='runs/cli-full']")
    page.click("#compare-button")
    page.wait_for_selector("#compare-plots svg")
    compared = page.inner_text("table.compare")
    assert "lora" in compared and "full" in compared and page.locator("table.compare tbody tr").count() == 2
    watched.check("compare")

    watched.open("#/playground/runs/form-lora")
    page.fill("#predict-inputs", "a wonderful and moving film\nawful boring plot")
    page.click("#predict-button")
    page.wait_for_selector("table.predictions tbody tr")
    cells = page.locator("table.predictions td.tuned").all_inner_texts()
    assert len(cells) == 2 and all(c.split()[0] in ("pos", "neg") for c in cells), cells
    watched.check("playground-predict")


LONG = """model:
  path: {model}
data:
  train: data/train.jsonl
  max_length: 32
task:
  type: classification
method:
  name: lora
train:
  max_steps: 100000
  batch_size: 4
  log_every: 2
  eval_every: 100000
eval:
  base: false
  linear_probe: false
  samples: 0
  forgetting: none
output_dir: ../outside-the-workspace
"""


def test_a_run_is_watched_stopped_and_resumed(watched, tiny_bert):
    page = watched.page
    watched.open("#/new")
    page.fill("#recipe-yaml", LONG.format(model=tiny_bert))
    # Its output folder is outside the workspace: the check says so beside the field (the form follows the rest of
    # the YAML), and a launch is refused (403).
    page.wait_for_function("document.querySelector('#err-f-output_dir').textContent.includes('outside')")
    assert page.get_attribute("#f-output_dir", "aria-invalid") == "true"
    assert page.input_value("#f-train-max_steps") == "100000" and page.input_value("#f-train-log_every") == "2"
    watched.provoked.append(("/api/runs", 403))
    page.click("#launch")
    page.wait_for_selector("#launch ~ div .error")
    page.fill("#f-output_dir", "runs/long-lora")
    assert "output_dir: runs/long-lora" in page.input_value("#recipe-yaml")
    page.wait_for_function("document.querySelector('#check-state').textContent === 'The recipe is valid.'")
    assert page.get_attribute("#f-output_dir", "aria-invalid") is None
    page.click("#launch")
    page.wait_for_function("location.hash === '#/run/runs/long-lora'")
    wait_status(page, "running")
    # Its curve grows while it trains.
    before = wait_points_above(page, "chart-loss", 0)
    wait_points_above(page, "chart-loss", before)
    # Progress and the time left, from the stream's status events.
    page.wait_for_function("document.querySelector('.progress-text').textContent.includes('left')")
    assert "of 100,000" in page.inner_text(".progress-text") and float(page.get_attribute("#run-progress", "value")) > 0

    page.click("#stop")
    wait_status(page, "interrupted")
    page.wait_for_selector("#resume")  # it saved a checkpoint to resume from
    stopped = points(page, "chart-loss")

    page.click("#resume")
    wait_status(page, "running")
    wait_points_above(page, "chart-loss", stopped)  # the replayed curve, then steps it had not trained
    page.click("#stop")
    wait_status(page, "interrupted")
    watched.check("run-stopped")


def test_a_chat_run_answers_tuned_and_base_side_by_side(watched):
    page = watched.page
    watched.open("#/playground/runs/chat-lora")
    page.fill("#chat-message", "What is the opposite of hot?")
    page.fill("#chat-max-tokens", "12")
    page.click("#chat-send")
    for side in ("tuned", "base"):
        page.wait_for_selector(f"#chat-{side} .msg.assistant[data-done]", timeout=RUN_TIMEOUT_MS)
        assert page.locator(f"#chat-{side} .error").count() == 0, page.inner_text(f"#chat-{side}")
    assert page.locator("#chat-tuned .msg.assistant[data-finish]").count() == 1
    watched.check("playground")


RECIPE = """# sentiment
model:
  path: models/x   # the base
data:
  train: a.jsonl
  max_length: 128

method:
  name: lora
  target_modules:
  - query
  - value
output_dir: runs/x
"""


def test_the_form_edits_one_key_of_the_yaml_and_keeps_the_rest(watched):
    """static/yaml.js, as the page loads it: a key is replaced in place (its comment kept), added under its section
    or as a new section, taken out with its block (an emptied section too); comments, blank lines and order stay;
    a float is written so that PyYAML reads a float (1.0e-7, not 1e-7), a word YAML would read otherwise quoted."""
    watched.open("#/runs")
    edit = """async ([text, steps]) => {
      const yaml = await import("./static/yaml.js");
      for (const [op, key, value] of steps) text = op === "set" ? yaml.setKey(text, key, value) : yaml.deleteKey(text, key);
      return [text, yaml.getKey(text, "model.path"), yaml.getKey(text, "method.name")];
    }"""
    text, path, method = watched.page.evaluate(edit, [RECIPE, [
        ["set", "model.path", "/data/models/minilm"], ["set", "data.test", "b.jsonl"], ["set", "train.lr", 1e-07],
        ["set", "method.target_modules", "all-linear"], ["set", "task.type", "true"], ["del", "data.max_length", None],
        ["set", "eval.forgetting", "none"], ["del", "eval.forgetting", None]]])
    assert text == """# sentiment
model:
  path: /data/models/minilm   # the base
data:
  train: a.jsonl
  test: b.jsonl

method:
  name: lora
  target_modules: all-linear
output_dir: runs/x
train:
  lr: 1.0e-7
task:
  type: "true"
"""
    assert (path, method) == ("/data/models/minilm", "lora")
    watched.check("yaml-editor")


def test_an_embedding_run_shows_cosine_similarities_tuned_and_base(watched):
    page = watched.page
    watched.open("#/playground/runs/emb-lora")
    page.fill("#predict-inputs", "a wonderful film\na brilliant movie\nawful boring plot")
    page.click("#predict-button")
    page.wait_for_selector("table.similarity")
    captions = page.locator("table.similarity caption").all_inner_texts()
    assert captions == ["Cosine similarity (tuned)", "Cosine similarity (base)"]  # a LoRA run's base: adapters off
    diagonal = [page.inner_text(f"table.similarity >> nth=0 >> tbody tr >> nth={i} >> td >> nth={i}") for i in range(3)]
    assert diagonal == ["1", "1", "1"]  # each text is its own nearest
    watched.check("playground-embed")


def test_without_the_token_the_ui_answers_401(browser, ui):
    context = browser.new_context()
    page = context.new_page()
    assert page.goto(ui).status == 401
    assert page.goto(f"{ui}?token=wrong").status == 401
    assert page.goto(f"{ui}static/app.js").status == 401
    context.close()
