"""`tunelab train|compare|advise|report|predict|embed|search|generate|serve|ui|eval|export|cv|sweep|data|models|config` — thin: parse arguments, call the library, print."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import typer

from . import atomic
from .errors import TunelabError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune pretrained transformers and measure what it gained.")
data_app = typer.Typer(no_args_is_help=True, help="Look at data files before training.")
config_app = typer.Typer(no_args_is_help=True, help="Config keys and resolved recipes.")
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")


def trust_code_option():
    return typer.Option(False, "--trust-remote-code", help="Run the Python code the model folder names (auto_map in "
                        "its config.json): only for a run you trust. A run's own config.yaml never turns this on.")


def allow_pickle_option():
    return typer.Option(False, "--allow-pickle", help="Also load weights stored as pickle (.bin/.pt), which can run "
                        "code when loaded: only for a run you trust. A run's own config.yaml never turns this on.")


@app.command()
def train(
    recipe: Optional[Path] = typer.Argument(None, help="YAML recipe, e.g. configs/classification/minilm-lora.yaml"),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted key=value overrides, e.g. train.lr=3e-4 output_dir=runs/try1"),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in output_dir."),
    resume: Optional[Path] = typer.Option(None, "--resume", help="Continue this unfinished run directory from its "
                                          "last good checkpoint (no recipe: the run's own config.yaml)."),
    resume_anyway: bool = typer.Option(False, "--resume-anyway", help="With --resume: go on even though config.yaml, "
                                       "a data file or the model changed since the checkpoint was written (by default "
                                       "such a resume is refused, naming what changed)."),
    trust_remote_code: bool = trust_code_option(),
    allow_pickle: bool = allow_pickle_option(),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Train in this many processes on this machine (torchrun "
                              "--nproc-per-node N; gloo on CPU, nccl on GPU). Several machines: run torchrun yourself."),
):
    """Fine-tune a model as the recipe says; writes a run directory."""
    import tunelab

    if nproc > 1:
        # torchrun starts the processes, each runs this same command without --nproc
        args = list(sys.argv[1:])
        if "--nproc" in args:
            i = args.index("--nproc")
            del args[i : i + 2]
        args = [a for a in args if not a.startswith("--nproc=")]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "tunelab", *args]
        sys.exit(subprocess.call(command))
    from .training import stop

    if resume is not None and (recipe is not None or overrides):
        raise TunelabError(f"--resume {resume} continues that run with its own config.yaml; give no recipe or "
                           f"overrides with it (edit {resume / 'config.yaml'} to change a setting).")
    if resume is None and resume_anyway:
        raise TunelabError("--resume-anyway goes with --resume RUN_DIR: it lets a run whose config.yaml, data or model "
                           "changed since its last checkpoint go on. Give --resume RUN_DIR too, or leave it out.")
    if resume is None and recipe is None:
        raise TunelabError("Give a recipe (`tunelab train configs/classification/minilm-lora.yaml`), or "
                           "--resume RUN_DIR to continue a run that stopped.")
    with stop.terminate_as_interrupt():  # SIGTERM ends it as Ctrl-C does; while it trains, after a checkpoint
        if resume is not None:
            # the run folder's own model.trust_remote_code / allow_pickle do not count, only these flags
            run = tunelab.resume(resume, anyway=resume_anyway, trust_remote_code=trust_remote_code,
                                 allow_pickle=allow_pickle)
        else:
            switches = [f"model.{k}=true" for k, on in (("trust_remote_code", trust_remote_code),
                                                        ("allow_pickle", allow_pickle)) if on]
            run = tunelab.train(recipe, [*(overrides or []), *switches], overwrite=overwrite)
    typer.echo(f"run directory: {run.dir}")


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    file: Optional[Path] = typer.Argument(None, help="JSONL/CSV/Parquet file of texts to label."),
    text: Optional[List[str]] = typer.Option(None, "--text", help="A text to label (repeatable)."),
    pair: Optional[List[str]] = typer.Option(None, "--pair", help="Runs trained on text pairs: the second text of each "
                                             "--text, in the same order (repeatable)."),
    text_field: Optional[str] = typer.Option(None, help="Text column of FILE (default: the run's data.text_field)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write predictions as JSONL here instead of stdout."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow replacing an existing --output file."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Prediction batch size."),
    task: Optional[str] = typer.Option(None, "--task", help="Which task of a multi-task run."),
    question: Optional[str] = typer.Option(None, "--question", help="qa runs: a question to answer from --context."),
    context: Optional[str] = typer.Option(None, "--context", help="qa runs: the passage the answer is taken from."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="reward runs: the prompt that each --text answers."),
    trust_remote_code: bool = trust_code_option(),
    allow_pickle: bool = allow_pickle_option(),
):
    """Label texts with a trained run: labels and per-class probabilities (qa runs: answer spans; reward runs:
    the reward of each reply)."""
    import tunelab

    if question is not None or context is not None:
        if question is None or context is None or file is not None or text:
            raise TunelabError("--question and --context go together, without FILE or --text: `tunelab predict RUN "
                               "--question 'Where was Ada born?' --context 'Ada was born in Leeds.'`.")
        text = [{"question": question, "context": context}]
    if prompt is not None:
        if not text or file is not None:
            raise TunelabError("--prompt goes with one or more --text replies to score, without FILE: `tunelab predict "
                               "RUN --prompt 'Name a colour.' --text 'Blue.' --text 'No.'`.")
        text = [{"prompt": prompt, "response": t} for t in text]
    if (file is None) == (not text):
        raise TunelabError("Give either a FILE of texts or one or more --text options to `tunelab predict` (not both, not neither).")
    check_output(output, file, overwrite)
    model = tunelab.load(run_dir, task=task, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    pairs = pair or None
    if text:
        texts = text
    else:  # what the task reads: texts (and pairs), SQuAD questions with contexts, prompts with responses
        texts, pairs = model.task.read_predict(file, text_field, model.cfg)
    preds = model.predict(texts, batch_size, pairs=pairs) if pairs else model.predict(texts, batch_size)
    lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in preds)
    if output is None:
        sys.stdout.write(lines)
    else:
        atomic.write_text(output, lines, "the --output file")
        typer.echo(f"{len(preds)} predictions -> {output}", err=True)
    closing = model.task.predict_summary(preds)  # reward: the mean reward, to compare two policies' replies by
    if closing:
        typer.echo(closing, err=True)


def read_texts(path: Path, field: str, key: str) -> tuple[list[str], list[int]]:
    """The `field` column of a JSONL/CSV/TSV/Parquet file (or the paragraphs of a .txt), with their row numbers."""
    from .data.sources import field_names, read_records

    records = read_records(path, key)
    if not records:
        raise TunelabError(f"{key} '{path}' has no rows.")
    if field not in records[0]["record"]:
        raise TunelabError(f"{key} '{path}' has no '{field}' column (found: {field_names(records[0]['record'])}). "
                           f"Name the text column with --text-field.")
    bad = [r["row"] for r in records if not isinstance(r["record"].get(field), str) or not r["record"][field].strip()]
    if bad:
        raise TunelabError(f"{key} '{path}' row {bad[0]} has no text in '{field}' ({len(bad)} such rows: "
                           f"{', '.join(map(str, bad[:10]))}). Fill or remove those rows.")
    return [r["record"][field] for r in records], [r["row"] for r in records]


@app.command()
def embed(
    run_dir: Path = typer.Argument(..., help="A finished embedding run directory."),
    input: Path = typer.Option(..., "--input", "-i", help="JSONL/CSV/Parquet file of texts (or a .txt of paragraphs)."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the vectors: a NumPy .npy file, one row "
                                "per input row, in input order."),
    text_field: str = typer.Option("text", help="Text column of the input."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow replacing an existing --output file."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Batch size."),
    trust_remote_code: bool = trust_code_option(),
    allow_pickle: bool = allow_pickle_option(),
):
    """Turn texts into vectors with an embedding run (L2-normalised when it was trained with task.normalize)."""
    import numpy as np

    import tunelab

    if output.suffix != ".npy":
        raise TunelabError(f"--output '{output}' should end in .npy (NumPy's format, read with numpy.load).")
    check_output(output, input, overwrite)
    texts, _ = read_texts(input, text_field, "input file")
    vectors = tunelab.load(run_dir, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle).embed(texts, batch_size)
    with atomic.staged_file(output, "the --output file") as tmp, open(tmp, "xb") as f:
        np.save(f, vectors)  # to an open file: np.save would add .npy to the temporary name
    typer.echo(f"{len(texts)} vectors of {vectors.shape[1]} dimensions -> {output}", err=True)


@app.command()
def search(
    run_dir: Path = typer.Argument(..., help="A finished embedding run directory."),
    corpus: Path = typer.Option(..., "--corpus", help="JSONL/CSV/Parquet file of documents (or a .txt of paragraphs)."),
    query: List[str] = typer.Option(..., "--query", "-q", help="A text to search for (repeatable)."),
    top_k: int = typer.Option(5, "--top-k", min=1, help="Documents shown per query."),
    text_field: str = typer.Option("text", help="Text column of the corpus."),
    batch_size: Optional[int] = typer.Option(None, min=1, help="Batch size."),
    trust_remote_code: bool = trust_code_option(),
    allow_pickle: bool = allow_pickle_option(),
):
    """The corpus documents nearest to each query by cosine similarity of an embedding run's vectors (exact)."""
    import tunelab

    texts, rows = read_texts(corpus, text_field, "corpus file")
    model = tunelab.load(run_dir, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    for q, found in zip(query, model.search(query, texts, top_k, batch_size)):
        typer.echo(f"query: {q}")
        for hit in found:
            text = " ".join(hit["text"].split())
            typer.echo(f"  {hit['rank']:>3}  {hit['score']:.4f}  row {rows[hit['index']]}: "
                       f"{text[:117] + '...' if len(text) > 120 else text}")


@app.command()
def cv(
    recipe: Path = typer.Argument(..., help="YAML recipe of a classification run."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted key=value overrides."),
    folds: int = typer.Option(5, "--folds", min=2, help="Number of stratified folds."),
    ensemble: bool = typer.Option(False, "--ensemble", help="Also score the fold models' averaged probabilities on data.test."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier cross-validation in output_dir."),
):
    """k-fold cross-validation: one run per fold, mean ± std of every metric in cv_summary.json."""
    from . import cv as cv_mod

    cv_mod.run(recipe, overrides or [], folds, overwrite, ensemble, echo=typer.echo)


@app.command()
def compare(
    recipe: Path = typer.Argument(..., help="YAML recipe; its data, seed, split and budget are used for every method."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted key=value overrides."),
    methods: str = typer.Option("full,freeze,lora,qlora,adapter,prompt,bitfit", "--methods",
                                help="Comma-separated methods to compare."),
    lr: Optional[List[str]] = typer.Option(None, "--lr", help="METHOD=LR, e.g. --lr lora=2e-4 (repeatable); "
                                                              "otherwise each method's usual LR."),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="METHOD.KEY=VALUE method setting, e.g. --set "
                                                                 "freeze.freeze_layers=4 (repeatable)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Optimizer steps per method (default: the recipe's budget)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Directory for the comparison (default runs/compare-<recipe>)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier comparison in --output."),
):
    """Train each method on the same data, seed and budget; table of params, storage, memory, time, latency, metric, forgetting."""
    from . import compare as compare_mod

    names = compare_mod.parse_methods(methods)
    compare_mod.run(recipe, overrides or [], names, str(output) if output else None, compare_mod.parse_lrs(lr), steps,
                    overwrite, echo=typer.echo, settings=compare_mod.parse_settings(set_, names))


@app.command()
def advise(
    model: Path = typer.Option(..., "--model", help="Local Hugging Face model directory, or a Hub id (org/name)."),
    task: str = typer.Option(..., "--task", help="classification, token_classification, qa, sft or causal_lm."),
    seq_len: int = typer.Option(..., "--seq-len", min=1, help="Tokens per example."),
    batch: int = typer.Option(..., "--batch", min=1, help="Examples per micro-batch."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Memory budget, e.g. 24GB or 16GiB (default: this "
                                                                "machine's RAM, or the GPU's memory under CUDA)."),
    tasks: int = typer.Option(1, "--tasks", min=1, help="How many tasks you will fine-tune this model for."),
    latency_critical: bool = typer.Option(False, "--latency-critical", help="Inference latency matters: "
                                                                          "recommend only methods that merge."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or bfloat16."),
    eval_batch_size: Optional[int] = typer.Option(None, "--eval-batch-size", min=1, help="eval.batch_size (default 64)."),
):
    """Estimate training memory per method (weights, gradients, optimizer, activations with and without gradient
    checkpointing, quantized base) and recommend the methods that fit."""
    from . import advise as advise_mod

    result = advise_mod.advise(model, task, seq_len, batch, advise_mod.parse_memory(memory) if memory else None,
                               tasks, latency_critical, dtype, eval_batch_size)
    typer.echo(advise_mod.format_advice(result))


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory or a `tunelab compare` directory.")):
    """(Re)write report.html of a run or a comparison: base vs tuned, curves, confusion matrix, samples."""
    from . import report as report_mod
    from .compare import rebuild_report

    if (run_dir / "compare.json").is_file():
        typer.echo(f"report: {rebuild_report(run_dir)}")
    elif (run_dir / "summary.json").is_file():
        typer.echo(f"report: {report_mod.write_run(run_dir)}")
    else:
        raise TunelabError(f"'{run_dir}' is neither a finished run (no summary.json) nor a comparison (no compare.json); "
                           f"give the directory `tunelab train` or `tunelab compare` wrote.")


@app.command()
def sweep(
    recipe: Path = typer.Argument(..., help="YAML recipe."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted key=value overrides."),
    space: Path = typer.Option(..., "--space", help="YAML search space: key: {low, high[, log]} or {choices: [...]}."),
    trials: int = typer.Option(10, "--trials", min=1, help="Number of trials."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier sweep in output_dir."),
):
    """Hyperparameter search with Optuna (TPE, median pruning on validation); best config saved as best.yaml."""
    from . import sweep as sweep_mod

    sweep_mod.run(recipe, overrides or [], space, trials, overwrite, echo=typer.echo)


@app.command()
def generate(
    source: Path = typer.Argument(..., help="An sft / causal_lm run directory, a plain model dir (e.g. a merged export), "
                                       "or a Hugging Face Hub id (org/name) of a chat model."),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", "-p", help="A user message to answer (repeatable)."),
    chat: bool = typer.Option(False, "--chat", help="Interactive multi-turn chat; an empty line or /exit ends it."),
    input_file: Optional[Path] = typer.Option(None, "--input", help="JSONL of prompts: a 'prompt' string or 'messages' per line."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="With --input: write {prompt, response} JSONL here."),
    max_new_tokens: int = typer.Option(128, min=1, help="Longest reply, in tokens."),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy; above 0 samples."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0, help="Nucleus sampling mass (with temperature > 0)."),
    system: Optional[str] = typer.Option(None, help="A system message put before every conversation."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow replacing an existing --output file."),
    task: Optional[str] = typer.Option(None, "--task", help="Which task of a multi-task run."),
    trust_remote_code: bool = trust_code_option(),
    allow_pickle: bool = allow_pickle_option(),
    revision: Optional[str] = typer.Option(None, "--revision", help="With a Hub id: branch, tag or commit (default main)."),
):
    """Generate replies with a trained causal LM: streamed to the terminal, or batched from a file."""
    import tunelab

    from . import hub
    from .data.sources import read_records
    from .predict import TunedModel

    if sum([bool(prompt), chat, input_file is not None]) != 1:
        raise TunelabError("Give exactly one of --prompt, --chat or --input to `tunelab generate`.")
    check_output(output, input_file, overwrite)
    is_run = (source / "config.yaml").is_file()
    if not is_run and not (source / "config.json").is_file() and not hub.is_hub_id(str(source)):
        raise TunelabError(f"'{source}' is neither a tunelab run directory (config.yaml), a model directory "
                           f"(config.json), nor a Hugging Face Hub id (org/name).")
    switches = dict(trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    model = tunelab.load(source, task=task, **switches) if is_run else \
        TunedModel.from_model_dir(str(source), revision=revision, **switches)
    opts = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, system=system)
    if prompt:
        for p in prompt:
            typer.echo(f"> {p}")
            model.generate(p, stream=True, **opts)
        return
    if chat:
        history: list[dict] = []
        typer.echo("chat: type a message; an empty line or /exit ends.", err=True)
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                break
            if not line or line == "/exit":
                break
            history.append({"role": "user", "content": line})
            reply = model.generate(history, stream=True, **opts)[0]
            history.append({"role": "assistant", "content": reply})
        return
    rows = []
    for r in read_records(input_file, "--input"):
        rec = r["record"]
        item = rec.get("messages") or rec.get("prompt")
        if not item:
            raise TunelabError(f"--input file '{input_file}' row {r['row']} has neither 'prompt' nor 'messages'; give one.")
        rows.append(item)
    replies = model.generate(rows, **opts)
    lines = "".join(json.dumps({"prompt": p, "response": t}, ensure_ascii=False) + "\n" for p, t in zip(rows, replies))
    if output is None:
        sys.stdout.write(lines)
    else:
        atomic.write_text(output, lines, "the --output file")
        typer.echo(f"{len(replies)} replies -> {output}", err=True)


@app.command()
def serve(
    runs: List[Path] = typer.Argument(..., help="Finished run directories (or plain model folders) to serve; each is "
                                      "the model id of its folder name. Adapter runs on one base share one copy."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; anything but loopback needs --api-key."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="TUNELAB_API_KEY", show_envvar=True,
                                          help="Require 'Authorization: Bearer KEY' on every request."),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="Most rows (prompts x n, or texts) in one batch."),
    batch_window_ms: float = typer.Option(10.0, "--batch-window-ms", min=0.0, help="How long the first request "
                                          "of a batch waits for others to join it, in milliseconds."),
    max_queue: int = typer.Option(64, "--max-queue", min=1, help="Requests that may wait; one more gets 429."),
    timeout: float = typer.Option(300.0, "--timeout", min=0.001, help="Seconds a request may take, queue included."),
    prefix_cache: bool = typer.Option(True, "--prefix-cache/--no-prefix-cache", help="Compute the start that prompts "
                                      "share (a system turn, a conversation so far) once and reuse it. Off: every "
                                      "prompt is prefilled whole, as `tunelab generate` does, to the last bit."),
    trust_remote_code: bool = trust_code_option(),
    allow_pickle: bool = allow_pickle_option(),
):
    """Serve runs over an OpenAI-compatible HTTP API (chat/completions, completions, embeddings, predict)."""
    from . import serve as serve_pkg

    serve_pkg.check_installed()
    from .serve import app as serve_app
    from .serve import engine

    settings = engine.Settings(max_batch=max_batch, batch_window=batch_window_ms / 1000, max_queue=max_queue,
                               timeout=timeout, prefix_cache=prefix_cache)
    serve_app.serve(runs, host, port, api_key, settings, trust_remote_code, allow_pickle)


@app.command()
def ui(
    workspace: Path = typer.Option(Path("."), "--workspace", help="The folder whose runs the UI shows; runs it starts "
                                   "are written in it, and relative paths in recipes are taken from it."),
    root: Optional[List[Path]] = typer.Option(None, "--root", help="Another folder the UI may read models and data "
                                              "from (repeatable); paths outside the workspace and the roots are "
                                              "refused."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; anything but loopback needs --token."),
    port: int = typer.Option(7860, "--port", min=0, max=65535, help="Port to listen on."),
    token: Optional[str] = typer.Option(None, "--token", envvar="TUNELAB_UI_TOKEN", show_envvar=True,
                                        help="Require this token on every request (the link printed at start "
                                        "carries it)."),
    trust_remote_code: bool = trust_code_option(),
    allow_pickle: bool = allow_pickle_option(),
):
    """A local web app: the workspace's runs, live curves, new runs from a form, compare, playground."""
    from . import ui as ui_pkg

    ui_pkg.check_installed()
    from .ui import app as ui_app

    ui_app.serve(workspace, root or [], host, port, token, trust_remote_code, allow_pickle)


@app.command("eval")
def eval_(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    file: Path = typer.Argument(..., help="Labelled JSONL/CSV/Parquet file."),
    text_field: Optional[str] = typer.Option(None, help="Text column (default: the run's data.text_field)."),
    label_field: Optional[str] = typer.Option(None, help="Label column (default: the run's data.label_field)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Metrics JSON path (default "
                                          "RUN_DIR/eval/<file stem>-<8 hex digits>.json, the digits a hash of the "
                                          "file's resolved path: files of one name in two folders keep apart; "
                                          "evaluating the same file again replaces its metrics)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow replacing an existing --output file."),
    task: Optional[str] = typer.Option(None, "--task", help="Which task of a multi-task run."),
    generate: bool = typer.Option(False, "--generate", help="sft / causal_lm / dpo runs: generate a reply to each "
                                  "row's prompt and score it against the row's reply (exact match, token F1, ROUGE-L, "
                                  "BLEU, length, share ended with EOS); the replies go into the metrics JSON."),
    rows: Optional[int] = typer.Option(None, "-n", "--rows", min=1, help="With --generate: the first N rows only "
                                       "(default all)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="With --generate: reply length "
                                                 "limit (default the run's eval.max_new_tokens)."),
    judge: Optional[str] = typer.Option(None, "--judge", help="With --generate: also score each reply, as eval.judge "
                                        "does: a reward-model run directory, or a Python function 'module:function' / "
                                        "'file.py:function' called as function(prompts, replies, references) (this "
                                        "runs your code: name only one you trust). Adds judge_mean and each reply's "
                                        "judge score."),
    trust_remote_code: bool = trust_code_option(),
    allow_pickle: bool = allow_pickle_option(),
):
    """Evaluate a trained run on a labelled file; prints and saves the metrics."""
    import tunelab

    given = [name for name, value in (("-n", rows), ("--max-new-tokens", max_new_tokens), ("--judge", judge))
             if value is not None]
    if not generate and given:
        raise TunelabError(f"{given[0]} applies to generated replies: add --generate, or drop it.")
    check_output(output, file, overwrite)
    out = output or default_eval_output(run_dir, file)
    check_output(out, file, overwrite=True)
    model = tunelab.load(run_dir, task=task, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if generate:
        metrics = model.evaluate_generation(file, rows, text_field, max_new_tokens, judge=judge)
    else:
        metrics = model.evaluate(file, text_field, label_field)
    atomic.write_json(out, {"file": str(file), **metrics}, "the --output file")
    typer.echo(format_metrics(metrics))
    typer.echo(f"metrics -> {out}")


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A finished run directory."),
    out: Path = typer.Argument(..., help="Directory to write."),
    fmt: str = typer.Option("peft", "--format", help="peft (adapter in Hugging Face peft layout), tunelab (tunelab's "
                            "own layout), sentence-transformers (embedding runs: a merged model with its pooling, "
                            "for SentenceTransformer(OUT)), or gguf (causal-LM runs: one merged GGUF file for "
                            "llama.cpp, with an Ollama Modelfile)."),
    merge: bool = typer.Option(False, "--merge", help="Fold the method into the base weights: a plain transformers model dir."),
    quant: str = typer.Option("f16", "--quant", help="--format gguf: the matrices' type, f32, f16 or q8_0 (8-bit, "
                              "about half f16's size). Norms and biases stay f32."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier export in OUT (a folder that "
                                   "`tunelab export` made; anything else is refused)."),
    trust_remote_code: bool = trust_code_option(),
    allow_pickle: bool = allow_pickle_option(),
):
    """Write a run's adapter (peft layout); with --merge, a plain model that loads with transformers alone; with
    --format gguf, a GGUF file and Modelfile for llama.cpp and Ollama. The export is built beside OUT and put in
    place only when it is complete."""
    from . import export as export_mod

    written = export_mod.run(run_dir, out, fmt, merge, overwrite, quant=quant, trust_remote_code=trust_remote_code,
                             allow_pickle=allow_pickle)
    info = json.loads((written / export_mod.INFO).read_text(encoding="utf-8"))
    if "gguf" in info:
        g = info["gguf"]
        typer.echo(f"wrote {g['file']}: {g['architecture']}, {g['quant']}, {g['bytes'] / 1e6:.1f} MB, "
                   f"{g['tokenizer']['tokens']:,} tokens (pre-tokenizer {g['tokenizer']['pre_tokenizer']}), chat "
                   f"template {'included' if g['tokenizer']['chat_template'] else 'none (plain text model)'}; "
                   f"Modelfile template: {g['modelfile']['format'] or 'pass-through'}; {g['seconds']} s")
        if g["modelfile"]["warning"]:
            typer.echo(f"warning: {g['modelfile']['warning']}", err=True)
    typer.echo(f"exported -> {written}")


def resolved(path: Path) -> Path:
    """The absolute path, links followed (as far as they go)."""
    try:
        return path.expanduser().resolve()
    except (OSError, RuntimeError):  # a loop of links
        return path.expanduser().absolute()


def check_output(output: Optional[Path], source: Optional[Path], overwrite: bool) -> None:
    """Refuse an --output that is the input file, or one that exists (a link too) without --overwrite. Results are
    written with atomic (a temporary name, renamed): a link at --output is replaced, never written through."""
    if output is None:
        return
    if source is not None and resolved(output) == resolved(source):
        raise TunelabError(f"--output '{output}' is the input file '{source}': writing the results there would replace "
                           f"your data. Choose another --output.")
    if (output.exists() or output.is_symlink()) and not overwrite:
        raise TunelabError(f"Output file '{output}' already exists. Choose another --output, or pass --overwrite to replace it.")


def default_eval_output(run_dir: Path, file: Path) -> Path:
    """RUN_DIR/eval/<stem>-<hash of the file's resolved path>.json: test.jsonl of two folders keep apart."""
    digest = hashlib.sha256(str(resolved(file)).encode("utf-8")).hexdigest()[:8]
    return Path(run_dir) / "eval" / f"{file.stem}-{digest}.json"


def format_metrics(m: dict) -> str:
    """Every scalar metric on one line, then per-class / per-type rows where the task has them."""
    scalars = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                        for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    lines = [scalars]
    per = m.get("per_class") or m.get("per_type") or {}
    if per and all(isinstance(c, dict) and {"precision", "recall", "f1"} <= set(c) for c in per.values()):
        lines.append(f"{'label':20} {'precision':>9} {'recall':>9} {'f1':>9} {'support':>8}")
    else:
        per = {}
    for name, c in per.items():
        lines.append(f"{name[:20]:20} {c['precision']:9.4f} {c['recall']:9.4f} {c['f1']:9.4f} {c.get('support', 0):8d}")
    cm = m.get("confusion_matrix")
    if cm:
        lines.append("confusion (rows true, cols predicted): " + "  ".join(f"{l}={row}" for l, row in zip(cm["labels"], cm["rows_true_cols_pred"])))
    return "\n".join(lines)


@data_app.command("inspect")
def data_inspect(
    source: Path = typer.Argument(..., help="A recipe (.yaml): its rows as its task and model's tokenizer encode them; "
                                  "or a JSONL/CSV/TSV/Parquet file of labelled texts."),
    overrides: Optional[List[str]] = typer.Argument(None, help="With a recipe: dotted key=value overrides."),
    examples: int = typer.Option(3, "-n", "--examples", min=0, help="With a recipe: how many examples to show."),
    split: str = typer.Option("train", "--split", help="With a recipe: the split to show (train, validation, test)."),
    html: Optional[Path] = typer.Option(None, "--html", help="Also write the inspection as an HTML page here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Allow replacing an existing --html file."),
    text_field: str = typer.Option("text", help="With a file: the text column."),
    label_field: str = typer.Option("label", help="With a file: the label column."),
    as_json: bool = typer.Option(False, "--json", help="Print the inspection as JSON."),
):
    """See what is trained: a recipe's examples with the tokens that carry loss marked, token lengths against
    data.max_length, label mixes and a template lint; or a file's rows read, dropped and why, labels, lengths."""
    from rich.console import Console

    from . import data
    from . import inspect as inspect_mod

    if html is not None and (html.exists() or html.is_symlink()) and not overwrite:
        raise TunelabError(f"--html file '{html}' already exists. Choose another name, or pass --overwrite to replace it.")
    if split not in ("train", "validation", "test"):
        raise TunelabError(f"--split {split}: give train, validation or test.")
    if source.suffix.lower() in (".yaml", ".yml"):
        from . import config

        result = inspect_mod.run(config.load(source, overrides or []), examples, split)
    else:
        if overrides:
            raise TunelabError(f"'{source}' is a data file: overrides ({' '.join(overrides)}) go with a recipe (.yaml).")
        result = data.inspect(source, text_field, label_field)
    if html is not None:
        inspect_mod.write_html(result, html, f"tunelab data inspect {source}")
    if as_json:
        typer.echo(json.dumps(result, indent=2, ensure_ascii=False))
    elif "task" not in result:
        typer.echo(data.format_report(result))
    else:
        console = Console(highlight=False, soft_wrap=True)
        # colour only where it shows: piped (or NO_COLOR) output gets brackets around the marked tokens instead
        if console.is_terminal and not console.no_color:
            console.print(inspect_mod.format_text(result, rich=True))
        else:
            typer.echo(inspect_mod.format_text(result))
    if html is not None:
        typer.echo(f"page: {html}", err=True)


models_app = typer.Typer(no_args_is_help=True, help="Fetch models from the Hugging Face Hub, list the cached ones, "
                                                    "import other formats.")
app.add_typer(models_app, name="models")


@models_app.command("fetch")
def models_fetch(
    repo_id: str = typer.Argument(..., help="A Hugging Face Hub model id, e.g. HuggingFaceTB/SmolLM2-135M-Instruct."),
    revision: Optional[str] = typer.Option(None, "--revision", help="A branch, tag or commit (default main)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Fetch pickled weights (pytorch_model.bin) "
                                      "when the repo has no safetensors: only for files you trust."),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Also fetch the modelling code the "
                                           "repo ships (*.py), for model.trust_remote_code=true."),
):
    """Download a model's files into the Hugging Face cache (HF_HOME / HF_HUB_CACHE), to train offline later
    (HF_HUB_OFFLINE=1) with model.path set to the same id."""
    from . import hub

    if not hub.is_hub_id(repo_id):
        raise TunelabError(f"'{repo_id}' is not a Hugging Face Hub id ('org/name' or 'name', and not an existing local "
                           f"path): `tunelab models fetch` downloads from the Hub; a local folder needs no fetching.")
    got = hub.download(repo_id, revision, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code,
                       key="tunelab models fetch", revision_key="--revision")
    files = [f for f in got.dir.iterdir() if f.is_file()]
    size = sum(f.stat().st_size for f in files)
    typer.echo(f"{repo_id} at {revision or 'main'}: commit {got.commit}, {len(files)} files, {size / 2**20:.1f} MB")
    typer.echo(f"local dir: {got.dir}")
    typer.echo(f"to train on exactly this commit: model.path={repo_id} model.revision={got.commit}")


@models_app.command("ls")
def models_ls(as_json: bool = typer.Option(False, "--json", help="Print the list as JSON.")):
    """The models in the Hugging Face cache: each cached revision's refs, commit, files and size on disk."""
    from huggingface_hub import constants

    from . import hub

    found = hub.cached_models()
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    if not found:
        typer.echo(f"no models in the Hugging Face cache ({constants.HF_HUB_CACHE}); `tunelab models fetch ID` adds one")
        return
    typer.echo(f"Hugging Face cache: {constants.HF_HUB_CACHE}")
    typer.echo(f"{'model':40} {'refs':16} {'commit':12} {'files':>5} {'size':>10}")
    for model in found:
        for r in model["revisions"]:
            refs = ",".join(r["refs"]) or "-"
            typer.echo(f"{model['id']:40} {refs:16} {r['commit'][:12]:12} {r['files']:5d} {r['size'] / 2**20:8.1f} MB")


@models_app.command("import")
def models_import(
    gguf: Path = typer.Argument(..., help="A .gguf model file (llama.cpp's format), e.g. SmolLM2-135M-Instruct.Q4_1.gguf."),
    out: Path = typer.Argument(..., help="Directory to write the Hugging Face model into (config.json, model.safetensors, tokenizer)."),
    dtype: str = typer.Option("float32", "--dtype", help="Weight dtype of the saved model: float32 or bfloat16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier import in OUT."),
):
    """Dequantize a GGUF file into a plain model directory that tunelab can train (model.path=OUT)."""
    from .importer import import_gguf

    import_gguf(gguf, out, overwrite=overwrite, dtype=dtype, echo=typer.echo)


@config_app.command("explain")
def config_explain():
    """Every config key with its default and a one-line description."""
    from . import config

    typer.echo(config.explain())


@config_app.command("show")
def config_show(
    recipe: Path = typer.Argument(..., help="YAML recipe."),
    overrides: Optional[List[str]] = typer.Argument(None, help="Dotted key=value overrides."),
):
    """Validate a recipe and print it resolved, defaults filled in."""
    from . import config

    typer.echo(config.to_yaml(config.load(recipe, overrides or [])))


def main() -> None:
    # typer >= 0.2x raises the exceptions of its own vendored click (typer._click), not the click package's;
    # typer.BadParameter is re-exported from whichever click typer uses, so its module has the right classes.
    click_exceptions = sys.modules[typer.BadParameter.__module__]
    try:
        # Non-standalone, typer turns Ctrl-C into Exit(130) and returns that exit code instead of exiting.
        code = app(standalone_mode=False)
    except TunelabError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        code = 130
    except Exception as e:  # click's own usage errors arrive here in non-standalone mode
        if isinstance(e, click_exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, typer.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, typer.Abort):
            sys.exit(1)
        raise
    if isinstance(code, int) and code:
        if code == 130:
            typer.echo("interrupted", err=True)
        sys.exit(code)
