"""report.html: the run page (base vs tuned, curves, confusion matrix, samples, data, config) and the compare
page, built from real tiny runs; escaping of user text; missing and broken files; and both pages opened in
headless Chromium, with checks shown to catch a broken page."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import make_chat_rows, make_rows, write_jsonl
from PIL import Image, ImageStat

import tunelab
from tunelab import config, pipeline, report
from tunelab.errors import TunelabError

HOSTILE = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
PNG = "data:image/png;base64,"


# -- runs -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clf_data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report-data")
    rows = list({r["text"]: r for r in make_rows(300, seed=7)}.values())  # distinct texts: no split leaks
    return {"train": write_jsonl(root / "train.jsonl", rows[:120]), "test": write_jsonl(root / "test.jsonl", rows[120:170])}


def _clf(out: Path, model: Path, data: dict[str, Path], *extra: str):
    return tunelab.train(None, [f"model.path={model}", "model.device=cpu", f"output_dir={out}",
                                f"data.train={data['train']}", f"data.test={data['test']}", "train.batch_size=16",
                                "train.max_steps=8", "train.eval_every=4", "train.log_every=1", "train.lr=1e-3",
                                *extra])


@pytest.fixture(scope="module")
def compare_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("compare")


@pytest.fixture(scope="module")
def lora_run(tiny_bert, clf_data, compare_dir):
    """A LoRA classification run with a linear probe and a test split, inside the compare folder."""
    return _clf(compare_dir / "lora", tiny_bert, clf_data, "method.name=lora")


@pytest.fixture(scope="module")
def bitfit_run(tiny_bert, clf_data, compare_dir):
    return _clf(compare_dir / "bitfit", tiny_bert, clf_data, "method.name=bitfit", "eval.linear_probe=false")


def _compare_row(run, latency: float, merged: float | None, forgetting: dict | None = None) -> dict:
    s = run.summary
    return {"method": s["method"], "status": "ok", "reason": None, "run_dir": str(run.dir), "lr": 1e-3,
            "trainable_params": s["trainable_params"], "total_params": s["total_params"],
            "trainable_percent": s["trainable_percent"], "storage_mb": s["artifact_mb"],
            "peak_memory_mb": s["peak_memory_mb"], "memory_kind": "rss", "train_seconds": s["train_seconds"],
            "tokens_per_second": s["tokens_per_second"], "latency_ms": latency, "latency_merged_ms": merged,
            "metric": "accuracy", "split": "test", "tuned": s["test"]["accuracy"],
            "base": s["base"]["test"]["accuracy"], "linear_probe": s.get("linear_probe", {}).get("test", {}).get("accuracy"),
            "forgetting": forgetting}


SKIPPED = {"method": "prefix", "status": "skipped", "reason": "prefix tuning needs a decoder, not <b>BERT</b>"}


@pytest.fixture(scope="module")
def compare_page(lora_run, bitfit_run, compare_dir) -> Path:
    forgetting = {"kind": "probe", "metric": "accuracy", "file": "general.jsonl", "before": 0.9, "after": 0.8,
                  "change": -0.1}
    rows = [_compare_row(lora_run, 2.5, 1.9, forgetting), _compare_row(bitfit_run, 2.0, None), SKIPPED]
    return report.write_compare(compare_dir, rows, title="sentiment: every method")


# -- reading the page back ---------------------------------------------------------------

class _Tables(HTMLParser):
    """Every table row of a page as its cells' text (unescaped)."""

    def __init__(self):
        super().__init__()
        self.rows, self._row, self._cell = [], None, None

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _rows(page: str) -> list[list[str]]:
    parser = _Tables()
    parser.feed(page)
    return parser.rows


def _images(page: str) -> list[Image.Image]:
    """Every embedded plot, decoded: a count of data URIs alone would pass a page of broken images."""
    found = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    return [Image.open(io.BytesIO(base64.b64decode(b))) for b in found]


def _scores(page: str) -> dict[tuple[str, str], list[str]]:
    """The base-vs-tuned rows by (split, metric): [base, (probe,) tuned, change]; a split is named on its first row."""
    section = page[page.index("<h2>Base vs tuned</h2>"):]
    out, split = {}, None
    for r in _rows(section[: section.index("</section>")]):
        if r[0] != "split":
            split = r[0].split(" (")[0] or split
            out[(split, r[1])] = r[2:]
    return out


def f4(v: float) -> str:
    return f"{v:.4f}"


# -- the run page --------------------------------------------------------------------------

def test_a_classification_run_page_holds_base_vs_tuned_plots_and_samples(lora_run):
    page = report.write_run(lora_run.dir).read_text(encoding="utf-8")
    s, rows, scores = lora_run.summary, _rows(page), _scores(page)

    # The centrepiece: base, probe, tuned per split and metric, with the change.
    assert ["split", "metric", "base", "linear probe", "tuned", "change"] in rows
    assert ["test (n=50)", "accuracy"] in [r[:2] for r in rows]
    for split, tuned in (("validation", s["eval"]), ("test", s["test"])):
        for metric in ("accuracy", "macro_f1", "loss"):
            expected = [s["base"][split][metric], s["linear_probe"][split][metric], tuned[metric]]
            assert scores[(split, metric)][:3] == [f4(v) for v in expected]
    assert set(scores) == {(split, m) for split in ("validation", "test") for m in ("accuracy", "macro_f1", "loss")}
    change = s["test"]["accuracy"] - s["base"]["test"]["accuracy"]
    assert scores[("test", "accuracy")][3] == (f"{change:+.4f}" if abs(change) >= 5e-5 else "0")

    # Confusion matrix + loss + validation metrics + LR, each a real PNG.
    images = _images(page)
    assert len(images) == 4 and all(im.format == "PNG" and im.width > 200 for im in images)
    assert "alt='confusion matrix, test split'" in page and "alt='learning rate vs step'" in page

    samples = json.loads((lora_run.dir / "samples.json").read_text())
    assert ["row", "text", "gold", "predicted before", "predicted after", "score before", "score after"] in rows
    assert any(r[1] == samples["before"][0]["text"] and r[2] == samples["after"][0]["gold"]
               and r[4] == samples["after"][0]["predicted"] for r in rows)
    assert ["", "train", "validation", "test"] in rows and ["rows_read", "120", "12", "50"] in rows  # data report
    assert ["trainable parameters", f"{s['trainable_params']:,} of {s['total_params']:,} ({s['trainable_percent']:.2f}%)"] in rows
    assert re.search(r"<pre>model:\n  path: .*name: lora", page, re.DOTALL)  # the resolved config
    assert "could not be drawn" not in page and "<script" not in page.lower()
    # Self-contained: nothing to fetch at view time.
    assert not re.search(r"\b(src|href)\s*=\s*(?!'data:image/png;base64,)|url\(|@import", page)


def test_an_sft_run_page_shows_generations_and_escapes_the_chat_markup(tiny_chat_llama, tmp_path):
    train = write_jsonl(tmp_path / "chat.jsonl", make_chat_rows(60, seed=3))
    run = tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={train}", "task.type=sft",
                               "data.dedupe=false", "data.max_length=64", "train.batch_size=8", "train.max_steps=4",
                               "train.eval_every=2", "train.log_every=1", "eval.samples=2", "eval.max_new_tokens=4",
                               "method.name=lora", f"output_dir={tmp_path / 'sft'}"])
    page = report.write_run(run.dir).read_text(encoding="utf-8")
    rows, scores = _rows(page), _scores(page)
    assert scores[("validation", "perplexity")][:2] == [f4(run.summary["base"]["validation"]["perplexity"]),
                                                         f4(run.summary["eval"]["perplexity"])]
    assert len(_images(page)) == 3  # no confusion matrix for a language model
    assert ["row", "prompt", "reference", "generated before", "generated after"] in rows
    # The prompt's ChatML tokens are text, not tags.
    assert "&lt;|im_start|&gt;user" in page and "<|im_start|>" not in page


def test_labels_and_texts_with_markup_are_escaped_everywhere(tiny_bert, tmp_path):
    rows = [dict(r, label=HOSTILE if r["label"] == "neg" else r"$\bad$") for r in make_rows(80, seed=3)]
    for r in rows[::4]:
        r["text"] = f"{r['text']} {HOSTILE}"
    data = {"train": write_jsonl(tmp_path / "train.jsonl", rows[:60]), "test": write_jsonl(tmp_path / "test.jsonl", rows[60:])}
    run = _clf(tmp_path / "run", tiny_bert, data, "method.name=lora", "train.max_steps=2", "eval.linear_probe=false",
               "eval.samples=8")
    page = report.write_run(run.dir).read_text(encoding="utf-8")
    assert HOSTILE not in page and "<script" not in page.lower()
    assert f"and {ESCAPED}</td>" in page  # a sample's text
    assert f"<td>labels.{ESCAPED}</td>" in page  # the data report's label counts
    # A label that is a TeX formula matplotlib cannot parse still gets its confusion matrix drawn.
    assert "alt='confusion matrix, test split'" in page and "could not be drawn" not in page


def test_missing_or_broken_files_leave_a_note_and_the_rest_of_the_page(lora_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("summary.json", "config.yaml", "data_report.json"):
        shutil.copy(lora_run.dir / name, run / name)
    (run / "data_report.json").write_text("{not json", encoding="utf-8")
    page = report.write_run(run).read_text(encoding="utf-8")
    assert "No metrics.jsonl in this run" in page and "No samples.json in this run" in page
    assert "This section could not be drawn: JSONDecodeError" in page
    assert len(_images(page)) == 1 and "alt='confusion matrix, test split'" in page  # built from summary.json
    assert f4(lora_run.summary["test"]["accuracy"]) in page

    # A run killed mid-write leaves a cut last line: skipped, counted, and the curves still drawn.
    shutil.copy(lora_run.dir / "metrics.jsonl", run / "metrics.jsonl")
    with (run / "metrics.jsonl").open("a") as f:  # an event to mark on the loss curve, a type to ignore, a cut line
        f.write('{"type": "unfreeze", "step": 4, "unfrozen": "layer 1", "still_frozen": []}\n{"type": "mystery"}\n'
                '{"type": "train", "st')
    (run / "config.yaml").unlink()
    page = report.write_run(run).read_text(encoding="utf-8")
    assert "1 line(s) of metrics.jsonl could not be read" in page and len(_images(page)) == 4
    assert "No config.yaml in this run" in page

    (run / "summary.json").unlink()
    with pytest.raises(TunelabError, match="has no summary.json, so it is not a finished tunelab run"):
        report.write_run(run)


def test_forgetting_is_shown_when_the_summary_has_it(lora_run, tmp_path):
    summary = dict(lora_run.summary, forgetting={"kind": "perplexity", "metric": "perplexity", "file": "wiki.txt",
                                                 "before": 12.0, "after": 13.5, "change": 1.5})
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    page = report.write_run(tmp_path).read_text(encoding="utf-8")
    assert ["perplexity", "perplexity", "wiki.txt", "12.0000", "13.5000", "+1.5000"] in _rows(page)
    assert "<td class='num worse'>+1.5000</td>" in page  # perplexity went up: worse


def test_a_multitask_run_page_has_a_table_and_a_matrix_per_task(tiny_bert, tmp_path):
    sentiment = write_jsonl(tmp_path / "sent.jsonl", make_rows(100, seed=1))
    topic = write_jsonl(tmp_path / "topic.jsonl", [{"text": r["text"], "label": "film" if "film" in r["text"] else "other"}
                                                   for r in make_rows(80, seed=2)])
    cfg = config.validate({"model": {"path": str(tiny_bert)}, "method": {"name": "lora"},
                           "tasks": [{"name": "sentiment", "data": {"train": str(sentiment)}},
                                     {"name": "topic", "weight": 0.5, "data": {"train": str(topic), "test": str(topic)}}],
                           "train": {"max_steps": 4, "batch_size": 8, "eval_every": 2, "log_every": 1},
                           "eval": {"linear_probe": False, "samples": 1}, "output_dir": str(tmp_path / "run")})
    run = pipeline.train(cfg)
    page = report.write_run(run.dir).read_text(encoding="utf-8")
    assert "<h3>sentiment <span class='note'>(classification)</span></h3>" in page
    # Both tasks have a (validation, accuracy) row: the parse keeps the last table's, topic's.
    assert _scores(page)[("test", "accuracy")][:2] == [f4(run.summary["base"]["topic"]["test"]["accuracy"]),
                                                      f4(run.summary["test"]["topic"]["accuracy"])]
    assert "<h3>sentiment: validation split</h3>" in page and "<h3>topic: test split</h3>" in page
    assert len(_images(page)) == 5 and "could not be drawn" not in page  # 2 matrices, loss, validation, LR


# -- the compare page -------------------------------------------------------------------------

def test_the_compare_page_lists_every_method_links_their_runs_and_plots(compare_page, lora_run, bitfit_run):
    page = compare_page.read_text(encoding="utf-8")
    rows = _rows(page)
    by_method = {r[0]: r for r in rows[1:]}
    assert set(by_method) == {"lora", "bitfit", "prefix"}
    assert by_method["prefix"][1:] == ["skipped", SKIPPED["reason"]]
    assert "not &lt;b&gt;BERT&lt;/b&gt;" in page and "<b>" not in page
    assert rows[0][8:] == ["latency ms", "merged latency ms", "tuned", "base", "linear probe", "change vs base",
                           "forgetting change"]
    assert by_method["bitfit"][8:10] == ["2.00", "cannot merge"] and by_method["lora"][8:10] == ["2.50", "1.90"]
    assert by_method["lora"][10] == f4(lora_run.summary["test"]["accuracy"]) and by_method["bitfit"][12] == "–"
    assert by_method["lora"][14] == "-0.1000"  # forgetting: after − before
    assert "<caption>task metric: accuracy on test</caption>" in page
    # Runs inside the compare folder are linked relatively (the folder can move), their pages written on demand.
    for run in (lora_run, bitfit_run):
        assert f"href='{run.dir.name}/report.html'" in page and (run.dir / "report.html").is_file()
    # metric vs trainable %, cost bars, loss overlay, forgetting bars
    assert len(_images(page)) == 4 and "could not be drawn" not in page


def test_a_compare_where_every_method_was_skipped_is_a_table_with_the_reasons(tmp_path):
    page = report.write_compare(tmp_path, [SKIPPED, {"method": "qlora", "status": "skipped", "reason": None}])
    rows = _rows(page.read_text(encoding="utf-8"))
    assert rows[1:] == [["prefix", "skipped", SKIPPED["reason"]], ["qlora", "skipped", "no reason given"]]
    assert PNG not in page.read_text(encoding="utf-8")


def test_a_run_outside_the_compare_folder_is_linked_by_absolute_uri(lora_run, tmp_path):
    assert report._run_link(lora_run.dir, tmp_path) == (lora_run.dir / "report.html").resolve().as_uri()


# -- in a browser ---------------------------------------------------------------------------------

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# The report has no script of its own; this one, added to a copy, says on the console how many images failed to
# decode (a broken image is never a console message), and its line proves the page reached its load event.
PROBE = """<script>
window.addEventListener("load", () => {
  const broken = [...document.images].filter(img => !img.complete || img.naturalWidth === 0).length;
  console.log("tunelab-probe images=" + document.images.length + " broken=" + broken);
});
</script>"""


@pytest.fixture(scope="session")
def chromium() -> str:
    """The browser, looked up before any run is trained for a test that would only be skipped."""
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("headless Chromium is not installed (Debian package 'chromium'); the browser checks need it")
    return exe


def _chromium(exe: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(dir=tmp_path, prefix="chromium-profile-")
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args], check=False,
                          capture_output=True, text=True, timeout=60)


def _page_problems(exe: str, page: Path, tmp_path: Path) -> tuple[list[str], int]:
    """(what went wrong loading `page`, how many images it has).

    With --enable-logging=stderr Chromium prints every console message, whatever its level, as
    `...:CONSOLE...] "text", source: url (line)`; a page without scripts has none, so any but the probe's is a
    problem (an uncaught error reads "Uncaught ...")."""
    probed = page.with_name(f"probed-{page.name}")  # beside the page: its relative links resolve as they would
    text = page.read_text(encoding="utf-8")
    probed.write_text(text.replace("</body>", PROBE + "</body>") if "</body>" in text else text + PROBE,
                      encoding="utf-8")
    result = _chromium(exe, tmp_path, "--enable-logging=stderr", "--v=0", "--dump-dom", probed.as_uri())
    console = re.findall(r':CONSOLE[^\]]*\] "(.*)", source:', result.stderr)
    probe = [line for line in console if line.startswith("tunelab-probe")]
    problems = [line for line in console if not line.startswith("tunelab-probe")]
    if len(probe) != 1:
        return problems + [f"the probe never reported (exit {result.returncode}): {result.stderr[-1500:]}"], 0
    images, broken = map(int, re.search(r"images=(\d+) broken=(\d+)", probe[0]).groups())
    return problems + ([f"{broken} broken image(s)"] if broken else []), images


def _screenshot(exe: str, page: Path, tmp_path: Path) -> Image.Image:
    shot = tmp_path / f"{page.parent.name}-{page.stem}.png"
    result = _chromium(exe, tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri())
    assert shot.is_file(), f"no screenshot (exit {result.returncode}): {result.stderr[-1500:]}"
    return Image.open(shot).convert("RGB")


def _blank(image: Image.Image) -> bool:
    """One flat colour, give or take a stray pixel or two (a lone heading on white already has ~200 colours)."""
    colours = image.getcolors(maxcolors=4096)  # None: more colours than that, certainly not blank
    return max(ImageStat.Stat(image).stddev) < 1 or (colours is not None and len(colours) <= 3)


@pytest.mark.browser
def test_both_pages_render_in_chromium_without_errors(chromium, lora_run, compare_page, tmp_path):
    run_page = report.write_run(lora_run.dir)
    for page in (run_page, compare_page):
        image = _screenshot(chromium, page, tmp_path)
        assert image.size == (1200, 2000) and not _blank(image), f"{page} renders blank"
        # More than text on white: tables and plots fill the first 2000 pixels (a lone heading scores ~5).
        assert min(ImageStat.Stat(image).stddev) > 20
        problems, images = _page_problems(chromium, page, tmp_path)
        assert problems == [], f"{page}: {problems}"
        assert images == page.read_text(encoding="utf-8").count(PNG) == 4


@pytest.mark.browser
def test_the_browser_checks_catch_a_broken_page(chromium, tmp_path):
    def page(name: str, body: str) -> Path:
        path = tmp_path / name
        path.write_text(f"<!doctype html><html><head><meta charset='utf-8'></head><body><h1>a heading</h1>{body}"
                        f"</body></html>", encoding="utf-8")
        return path

    problems, _ = _page_problems(chromium, page("throws.html", '<script>throw new Error("x")</script>'), tmp_path)
    assert problems == ["Uncaught Error: x"]
    problems, _ = _page_problems(chromium, page("bad-png.html", f'<img src="{PNG}AAAA">'), tmp_path)
    assert problems == ["1 broken image(s)"]
    problems, _ = _page_problems(chromium, page("missing.html", '<img src="missing.png">'), tmp_path)
    assert problems == ["1 broken image(s)"]
    # (The report pages above are the other side: pages that must pass.)
    empty = tmp_path / "empty.html"
    empty.write_text("<!doctype html><html><body></body></html>", encoding="utf-8")
    assert _blank(_screenshot(chromium, empty, tmp_path))
