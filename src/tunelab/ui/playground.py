"""The web UI's playground: try a finished run beside its base model.

- POST /api/playground/{id}/chat: a causal-LM run's reply, streamed as server-sent events over the POST response
  (`event: delta` {"text"} ..., then `event: end` {"finish_reason"}), from the tuned model or its base;
- POST /api/playground/{id}/predict: what `tunelab predict` returns for the inputs, from the tuned model, and from
  the base where that means something; an embedding run gives each side's vectors and their cosine similarities.

Each run is loaded behind `tunelab serve`'s engine (serve/engine.py): one worker thread owns the model, requests
queue and batch there, replies come from its decode loop, and a client that leaves cancels its reply. At most
MAX_LOADED runs stay loaded, the least recently used one dropped first.

The base model: for a method that keeps its weights beside the base (LoRA, adapters, prefix, ...; not when it trains
base biases), the same loaded model with its adapters switched off (`methods.adapters_disabled`); for one that
changes the base (full, freeze, bitfit), model.path loaded on its own (`TunedModel.base_model`), reading inputs as
the run does (its chat template, its pooling). A classifier-like run's base has no trained head, so it has no base
predictions. Models load with the UI's
trust_remote_code / allow_pickle, as `tunelab predict` does with its flags; a run's own config.yaml never turns
them on.
"""

from __future__ import annotations

import asyncio
import collections
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .. import methods
from .. import predict as predict_mod
from ..errors import TunelabError
from ..serve import engine as eng
from ..serve.app import check_roles
from .plan import Body, ui_of
from .workspace import ApiError

router = APIRouter()

MAX_LOADED = 2  # runs kept loaded; the least recently used goes first
ADAPTERS_OFF = "adapters-off"  # the adapter name of a base that is the tuned model with its adapters switched off
SETTINGS = eng.Settings(max_batch=8, batch_window=0.005, max_queue=16, timeout=600.0)


class Message(Body):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(Body):
    messages: list[Message]
    model: Literal["tuned", "base"] = "tuned"
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


class PredictBody(Body):
    inputs: list[str | dict]
    pairs: list[str] | None = None


class Playground(eng.Engine):
    """serve's engine, which also runs a base that is the tuned model with its adapters switched off."""

    def run(self, batch: list[eng.Job]) -> None:
        if batch and batch[0].served.adapter == ADAPTERS_OFF:
            with methods.adapters_disabled(batch[0].served.model.model):
                return super().run(batch)
        return super().run(batch)


@dataclass
class Loaded:
    """One run in the playground: its engine, its tuned model, and its base once asked for (or why it has none)."""

    engine: Playground
    finished: float  # its summary.json's mtime when loaded: a run trained again in its folder is loaded again
    base: eng.Served | None = None
    base_reason: str | None = None
    base_ready: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def tuned(self) -> eng.Served:
        return self.engine.models["tuned"]


class Cache:
    """The loaded runs of one app, by run folder, least recently used first."""

    def __init__(self, trust_remote_code: bool, allow_pickle: bool):
        self.switches = {"trust_remote_code": trust_remote_code, "allow_pickle": allow_pickle}
        self.loaded: collections.OrderedDict[Path, Loaded] = collections.OrderedDict()
        self.lock = threading.Lock()

    def get(self, run_dir: Path) -> Loaded:
        """The run's entry, its engine started (loading in its worker) if it was not loaded."""
        finished = (run_dir / "summary.json").stat().st_mtime
        with self.lock:
            entry = self.loaded.get(run_dir)
            if entry is not None and entry.engine.state != "failed" and entry.finished == finished:
                self.loaded.move_to_end(run_dir)
                return entry
            if entry is not None:
                threading.Thread(target=entry.engine.stop, daemon=True).start()
            entry = Loaded(Playground([run_dir], SETTINGS, self.load_tuned), finished)
            entry.engine.start()
            self.loaded[run_dir] = entry
            self.loaded.move_to_end(run_dir)
            while len(self.loaded) > MAX_LOADED:
                _, dropped = self.loaded.popitem(last=False)
                # its replies in flight finish first; the model goes once nothing refers to it
                threading.Thread(target=dropped.engine.stop, daemon=True).start()
            return entry

    def forget(self, run_dir: Path, entry: Loaded) -> None:
        with self.lock:
            if self.loaded.get(run_dir) is entry:
                del self.loaded[run_dir]

    def load_tuned(self, paths: list[Path]) -> dict[str, eng.Served]:
        cfg, _ = predict_mod.read_run(paths[0])
        if cfg.tasks is not None:
            raise TunelabError(f"'{paths[0].name}' is a multi-task run: the playground tries single-task runs. Try "
                               f"one task with `tunelab predict {paths[0]} --task NAME`.")
        model = predict_mod.load(paths[0], **self.switches)
        return {"tuned": eng.Served("tuned", paths[0], model, "default", eng.kind_of(model.task))}

    def base_of(self, entry: Loaded) -> None:
        """Settle the entry's base (once): the tuned model with adapters off, model.path loaded apart, or none."""
        with entry.lock:
            if entry.base_ready:
                return
            tuned = entry.tuned
            cfg = tuned.model.cfg
            changes_base = methods.get(cfg.method.name).CHANGES_BASE or getattr(cfg.method, "bias", "none") != "none"
            if tuned.kind == eng.PREDICT:
                entry.base_reason = (f"The base model has no trained head for a {cfg.task.type} run (its head would "
                                     f"be freshly initialised), so only the tuned model predicts; the run's summary "
                                     f"has the base model's figures on its evaluation splits.")
            elif not changes_base:
                entry.base = eng.Served("base", tuned.source, tuned.model, ADAPTERS_OFF, tuned.kind)
            else:  # the method changed the base's own weights: model.path loaded on its own
                entry.base = eng.Served("base", tuned.source, tuned.model.base_model(), "default", tuned.kind)
            entry.base_ready = True


def cache_of(request: Request) -> Cache:
    state = request.app.state
    if getattr(state, "playground", None) is None:
        ui = ui_of(request)
        state.playground = Cache(ui.trust_remote_code, ui.allow_pickle)
    return state.playground


async def ready(request: Request, run_id: str) -> Loaded:
    """The run loaded (loading it if needed, which may take a while), or its loading error as a 400."""
    run_dir = ui_of(request).run_dir(run_id)
    if not all((run_dir / name).is_file() for name in ("config.yaml", "labels.json", "summary.json")):
        raise ApiError(409, f"Run '{run_id}' has not finished: the playground tries finished runs (a run writes its "
                            f"summary.json as it ends).")
    cache = cache_of(request)
    entry = cache.get(run_dir)
    while entry.engine.state == "loading":
        await asyncio.sleep(0.05)
    if entry.engine.state == "failed":
        cache.forget(run_dir, entry)
        e = entry.engine.error
        raise ApiError(400, str(e) if isinstance(e, TunelabError) else f"Loading '{run_id}' failed: "
                                                                      f"{type(e).__name__}: {e}")
    return entry


async def result(job: eng.Job, future):
    """A job's answer; a refused input as a 400 naming the field."""
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        job.cancelled = True
        raise
    except eng.ClientError as e:  # a refused input, a full queue (429), the timeout (504)
        raise ApiError(e.status, e.message, e.param) from None
    except TunelabError as e:
        raise ApiError(400, str(e)) from None
    except Exception as e:  # noqa: BLE001 - the worker logged it; the page gets a sentence, not a bare 500
        raise ApiError(500, f"The model failed on this request ({type(e).__name__}: {e}); the UI's log has the "
                            f"traceback.") from None


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


@router.post("/api/playground/{run_id:path}/chat")
async def chat(run_id: str, req: ChatBody, request: Request):
    messages = [m.model_dump() for m in req.messages]
    if not messages:
        raise ApiError(400, "'messages' is empty: give at least one user message.", "messages")
    try:
        check_roles(messages)
    except eng.ClientError as e:
        raise ApiError(400, e.message, e.param) from None
    if req.max_tokens is not None and req.max_tokens < 1:
        raise ApiError(400, f"max_tokens={req.max_tokens} is out of range: give at least 1.", "max_tokens")
    if not 0 <= req.temperature <= 2:
        raise ApiError(400, f"temperature={req.temperature} is out of range: 0 (greedy) to 2.", "temperature")
    if not 0 < req.top_p <= 1:
        raise ApiError(400, f"top_p={req.top_p} is out of range: above 0, at most 1.", "top_p")
    entry = await ready(request, run_id)
    if entry.tuned.kind != eng.GENERATE:
        raise ApiError(400, f"'{run_id}' is a {entry.tuned.model.cfg.task.type} run, which writes no text: use "
                            f"POST /api/playground/{run_id}/predict.", "model")
    served = await base_or_tuned(request, entry, req.model)
    payload = {"prompts": [messages], "chat": True, "max_tokens": req.max_tokens, "temperature": req.temperature,
               "top_p": req.top_p, "seed": req.seed, "stop": [], "n": 1}
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = eng.Job(served, eng.GENERATE, payload, on_event=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    job.result.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, ("end", None, None)))
    submit(entry, job)
    await result(job, job.accepted)  # a prompt the model cannot take is a 400, not a stream
    return StreamingResponse(stream(job, events), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def submit(entry: Loaded, job: eng.Job) -> None:
    try:
        entry.engine.submit(job)
    except eng.ClientError as e:
        raise ApiError(e.status, e.message, e.param) from None


async def stream(job: eng.Job, events: asyncio.Queue):
    done = False
    try:
        reason = None
        while True:
            kind, _, value = await events.get()
            if kind == "delta":
                yield sse("delta", {"text": value})
            elif kind == "finish":
                reason = value
            else:
                break
        try:
            job.result.result()
        except Exception as e:  # noqa: BLE001 - a timeout or a failed batch: said in the stream, which has begun
            yield sse("error", {"message": e.message if isinstance(e, eng.ClientError) else str(e)})
            done = True
            return
        yield sse("end", {"finish_reason": reason})
        done = True
    finally:
        if not done:  # the page went away: the reply stops at the next token
            job.cancelled = True


async def base_or_tuned(request: Request, entry: Loaded, side: str) -> eng.Served:
    if side == "tuned":
        return entry.tuned
    try:
        await asyncio.to_thread(cache_of(request).base_of, entry)
    except TunelabError as e:
        raise ApiError(400, f"The base model of this run could not be loaded: {e}", "model") from None
    if entry.base is None:
        raise ApiError(400, entry.base_reason, "model")
    return entry.base


def similarities(vectors: np.ndarray) -> list[list[float]]:
    """Cosine similarity of every pair of vectors."""
    v = vectors.astype(np.float64)
    unit = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return (unit @ unit.T).tolist()


@router.post("/api/playground/{run_id:path}/predict")
async def predict(run_id: str, req: PredictBody, request: Request):
    if not req.inputs:
        raise ApiError(400, "'inputs' is empty: give at least one input to predict.", "inputs")
    if req.pairs is not None and len(req.pairs) != len(req.inputs):
        raise ApiError(400, f"'pairs' has {len(req.pairs)} texts for {len(req.inputs)} inputs: give each input its "
                            f"second text, in the same order.", "pairs")
    entry = await ready(request, run_id)
    tuned = entry.tuned
    if tuned.kind == eng.GENERATE:
        raise ApiError(400, f"'{run_id}' is a {tuned.model.cfg.task.type} run, which writes text: use POST "
                            f"/api/playground/{run_id}/chat.", "inputs")
    await asyncio.to_thread(cache_of(request).base_of, entry)
    if tuned.kind == eng.EMBED:
        if req.pairs is not None or not all(isinstance(x, str) for x in req.inputs):
            raise ApiError(400, "An embedding run embeds texts: give 'inputs' as a list of strings and no 'pairs'; "
                                "the answer has each model's vectors and their cosine similarities.", "inputs")
        sides = {"tuned": tuned, "base": entry.base}
        vectors = {}
        for side, served in sides.items():
            if served is not None:
                job = eng.Job(served, eng.EMBED, {"texts": list(req.inputs)})
                submit(entry, job)
                vectors[side] = np.asarray((await result(job, job.result))["vectors"])
        return {"kind": "embed", "tuned": vectors["tuned"].tolist(),
                "base": vectors["base"].tolist() if "base" in vectors else None,
                "similarities": {side: similarities(v) for side, v in vectors.items()} | (
                    {} if "base" in vectors else {"base": None}),
                "base_reason": entry.base_reason}
    job = eng.Job(tuned, eng.PREDICT, {"items": list(req.inputs), "pairs": req.pairs})
    submit(entry, job)
    return {"kind": "predict", "tuned": await result(job, job.result), "base": None, "base_reason": entry.base_reason}
