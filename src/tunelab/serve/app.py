"""The HTTP side of `tunelab serve`: OpenAI's request and response shapes on FastAPI, errors as OpenAI's error JSON,
the API key, Server-Sent Events for streams, and uvicorn with a graceful shutdown. Every forward pass happens in
the engine's worker thread (engine.py); handlers here only check requests, queue jobs and await their futures."""

from __future__ import annotations

import asyncio
import base64
import hmac
import ipaddress
import json
import logging
import signal
import time
import uuid
from contextlib import asynccontextmanager
from typing import Literal

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

from ..errors import TunelabError
from . import engine as eng

log = logging.getLogger("tunelab.serve")

MAX_N = 8  # choices per request: each is a row of a batch


class Strict(BaseModel):
    # Strict: a string where a number belongs is an error naming the field, not a silent conversion. Unknown keys
    # (user, logprobs=false, ...) are ignored, as OpenAI-compatible servers do.
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]


class StreamOptions(Strict):
    include_usage: bool = False


UNSUPPORTED = ("logprobs", "top_logprobs", "tools", "functions", "logit_bias", "echo", "suffix", "audio")


class Sampling(Strict):
    model_config = ConfigDict(strict=True, extra="allow")  # extras kept, to refuse the features not served
    model: str
    max_tokens: int | None = Field(None, description="Longest reply in tokens; default: what the context leaves.")
    temperature: float = Field(1.0, description="0 is greedy; OpenAI's default is 1.")
    top_p: float = 1.0
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None


class ChatRequest(Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = None


class CompletionRequest(Sampling):
    prompt: str | list[str]
    temperature: float = 1.0


class EmbeddingRequest(Strict):
    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"


class PredictRequest(Strict):
    model: str
    input: str | dict | list[str | dict] = Field(
        description="Texts to label; qa runs: {question, context} objects; reward runs: {prompt, response}.")
    pairs: str | list[str] | None = Field(None, description="Runs trained on pairs: each input's second text.")


def error(status: int, message: str, param: str | None = None, code: str | None = None,
          headers: dict | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_exceeded"}.get(
        status, "invalid_request_error" if status < 500 else "server_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status,
                        headers=headers)


def field_name(loc: tuple) -> str:
    # pydantic adds the union member it tried ('str', 'list[str]') to the location: not a field
    parts = [p for p in loc if p != "body" and not (isinstance(p, str) and (p in ("str", "int", "float", "bool", "dict",
                                                                                   "list") or "[" in p))]
    name = ""
    for p in parts:
        name += f"[{p}]" if isinstance(p, int) else (f".{p}" if name else str(p))
    return name


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(engine: eng.Engine, api_key: str | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)  # after uvicorn has let in-flight requests finish: drain the rest

    app = FastAPI(title="tunelab serve", lifespan=lifespan,
                  description="Tuned runs behind OpenAI's API: chat and text completions, embeddings, and "
                              "/v1/predict for runs that label text.")

    @app.middleware("http")
    async def authorize(request: Request, call_next):
        if api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(401, "Missing or wrong API key: send the header 'Authorization: Bearer KEY' with the "
                                  "key the server was started with (--api-key or TUNELAB_API_KEY).",
                             code="invalid_api_key")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        name = field_name(tuple(first.get("loc", ())))
        if first.get("type") == "json_invalid" or (not name and isinstance(first.get("input"), (bytes, str))):
            why = first.get("ctx", {}).get("error", "it does not parse")
            return error(400, f"The request body is not valid JSON ({why}); send a JSON object with the header "
                              f"'Content-Type: application/json'.", code="invalid_json")
        if not name:
            return error(400, f"The request body must be a JSON object, not {type(first.get('input')).__name__}.",
                         code="invalid_type")
        if first.get("type") == "missing":
            return error(400, f"'{name}' is required.", name, "missing_field")
        return error(400, f"'{name}': {first.get('msg')} (got {first.get('input')!r:.80}).", name, "invalid_type")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    @app.exception_handler(eng.ClientError)
    async def client_error(request: Request, exc: eng.ClientError):
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return error(exc.status, exc.message, exc.param, exc.code, headers)

    def served(name: str, kind: str) -> eng.Served:
        if engine.state != "ready":
            raise eng.ClientError("The models are still loading; poll GET /health until it says ready.", status=503,
                                  code="loading")
        if name not in engine.models:
            raise eng.ClientError(f"The model '{name}' is not served here; the served models are: "
                                  f"{', '.join(engine.models)}.", "model", 404, "model_not_found")
        s = engine.models[name]
        if s.kind != kind:
            use = {eng.GENERATE: "/v1/chat/completions or /v1/completions", eng.EMBED: "/v1/embeddings",
                   eng.PREDICT: "/v1/predict"}[s.kind]
            raise eng.ClientError(f"The model '{name}' is a {s.model.cfg.task.type} run, which this endpoint does "
                                  f"not serve: use {use}.", "model", code="wrong_endpoint")
        return s

    async def wait(job: eng.Job, future):
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    @app.get("/health")
    async def health():
        if engine.state == "ready":
            return {"status": "ready"}
        if engine.state == "failed":
            return JSONResponse({"status": "failed", "error": str(engine.error)}, 503)
        return JSONResponse({"status": "loading"}, 503)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [{"id": s.id, "object": "model", "created": s.created, "owned_by": "tunelab",
                                            "task": s.model.cfg.task.type, "endpoint": s.kind}
                                           for s in engine.models.values()]}

    def sampling(req: Sampling, prompts: list, chat: bool, max_tokens: int | None) -> dict:
        extra = req.model_extra or {}
        asked = [k for k in UNSUPPORTED if extra.get(k)]
        fmt = extra.get("response_format")
        if fmt and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
            asked.append("response_format")
        if asked:
            raise eng.ClientError(f"'{asked[0]}' is not supported by tunelab serve: leave it out (the server "
                                  f"writes plain text replies).", asked[0], code="unsupported_parameter")
        if max_tokens is not None and max_tokens < 1:
            raise eng.ClientError(f"max_tokens={max_tokens} is out of range: give at least 1.", "max_tokens")
        if not 0 <= req.temperature <= 2:
            raise eng.ClientError(f"temperature={req.temperature} is out of range: 0 (greedy) to 2.", "temperature")
        if not 0 < req.top_p <= 1:
            raise eng.ClientError(f"top_p={req.top_p} is out of range: above 0, at most 1.", "top_p")
        if not 1 <= req.n <= MAX_N:
            raise eng.ClientError(f"n={req.n} is out of range: 1 to {MAX_N}.", "n")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 4:
            raise eng.ClientError(f"stop has {len(stop)} strings; give at most 4.", "stop")
        return {"prompts": prompts, "chat": chat, "max_tokens": max_tokens, "temperature": req.temperature,
                "top_p": req.top_p, "seed": req.seed, "stop": stop, "n": req.n}

    async def complete(req: Sampling, payload: dict, chat: bool):
        s = served(req.model, eng.GENERATE)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if not req.stream:
            job = engine.submit(eng.Job(s, eng.GENERATE, payload))
            out = await wait(job, job.result)
            return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": s.id, "choices": [choice(c, chat) for c in out["choices"]],
                    "usage": usage(out["prompt_tokens"], sum(c["tokens"] for c in out["choices"]))}
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job = eng.Job(s, eng.GENERATE, payload, on_event=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        job.result.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, ("end", None, None)))
        engine.submit(job)
        prompt_tokens = await wait(job, job.accepted)  # a refused prompt is an error status, not a stream
        return StreamingResponse(stream(job, rid, created, s.id, chat, events, prompt_tokens, req),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def stream(job, rid, created, model_id, chat, events, prompt_tokens, req):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(index, delta=None, reason=None):
            c = {"index": index, "finish_reason": reason}
            if chat:
                c["delta"] = delta if delta is not None else {}
                c["logprobs"] = None
            else:
                c["text"], c["logprobs"] = (delta or {}).get("content", ""), None
            return sse({"id": rid, "object": obj, "created": created, "model": model_id, "choices": [c]})

        done = False
        try:
            if chat:
                for i in range(job.rows()):  # every choice opens with the assistant's role, as OpenAI's do
                    yield chunk(i, {"role": "assistant", "content": ""})
            while True:
                kind, index, value = await events.get()
                if kind == "delta":
                    yield chunk(index, {"content": value})
                elif kind == "finish":
                    yield chunk(index, None, value)
                else:
                    break
            try:
                out = job.result.result()
            except Exception as e:  # noqa: BLE001 - a timeout, or a failure the worker logged: said in the stream
                message, code = (e.message, e.code) if isinstance(e, eng.ClientError) else (str(e), None)
                yield sse({"error": {"message": message, "type": "server_error", "param": None, "code": code}})
                done = True
                return
            if req.stream_options and req.stream_options.include_usage:
                yield sse({"id": rid, "object": obj, "created": created, "model": model_id, "choices": [],
                           "usage": usage(sum(prompt_tokens), sum(c["tokens"] for c in out["choices"]))})
            yield "data: [DONE]\n\n"
            done = True
        finally:
            if not done:  # the client went away: its rows stop at the next step
                job.cancelled = True

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest):
        if not req.messages:
            raise eng.ClientError("'messages' is empty: give at least one user message.", "messages")
        messages = [{"role": "system" if m.role == "developer" else m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in req.messages]
        check_roles(messages)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return await complete(req, sampling(req, [messages], True, max_tokens), True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise eng.ClientError("'prompt' is an empty list: give at least one prompt.", "prompt")
        return await complete(req, sampling(req, prompts, False, req.max_tokens), False)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        s = served(req.model, eng.EMBED)
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        if not texts:
            raise eng.ClientError("'input' is an empty list: give at least one text.", "input")
        job = engine.submit(eng.Job(s, eng.EMBED, {"texts": texts}))
        out = await wait(job, job.result)
        vectors = np.asarray(out["vectors"], dtype=np.float32)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode() if req.encoding_format == "base64"
                 else v.tolist()} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": s.id, "usage": {"prompt_tokens": out["prompt_tokens"],
                                                                       "total_tokens": out["prompt_tokens"]}}

    @app.post("/v1/predict")
    async def predict(req: PredictRequest):
        s = served(req.model, eng.PREDICT)
        items = list(req.input) if isinstance(req.input, list) else [req.input]
        pairs = [req.pairs] if isinstance(req.pairs, str) else req.pairs
        if not items:
            raise eng.ClientError("'input' is an empty list: give at least one item.", "input")
        if pairs is not None and len(pairs) != len(items):
            raise eng.ClientError(f"'pairs' has {len(pairs)} texts for {len(items)} inputs; give one per input.",
                                  "pairs")
        job = engine.submit(eng.Job(s, eng.PREDICT, {"items": items, "pairs": pairs}))
        return {"object": "list", "model": s.id, "data": await wait(job, job.result)}

    return app


def check_roles(messages: list[dict]) -> None:
    """An optional system turn, then user and assistant alternating from a user turn, ending on a user turn."""
    body = messages[1:] if messages[0]["role"] == "system" else messages
    offset = len(messages) - len(body)
    if not body:
        raise eng.ClientError("'messages' has a system message only; add a user message.", "messages")
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise eng.ClientError(f"messages[{i + offset}].role is {m['role']!r} where {expected!r} belongs: roles go "
                                  f"in order (an optional system message first, then user and assistant alternating, "
                                  f"starting with user).", f"messages[{i + offset}].role")
    if body[-1]["role"] != "user":
        raise eng.ClientError(f"messages[{len(messages) - 1}] is an assistant message: the last message must be the "
                              f"user's, for the model to reply to.", f"messages[{len(messages) - 1}].role")


def choice(c: dict, chat: bool) -> dict:
    reason = c["finish_reason"]
    if chat:
        return {"index": c["index"], "message": {"role": "assistant", "content": c["text"]}, "logprobs": None,
                "finish_reason": reason}
    return {"index": c["index"], "text": c["text"], "logprobs": None, "finish_reason": reason}


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def build(paths, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          settings: eng.Settings | None = None, trust_remote_code: bool = False, allow_pickle: bool = False,
          log_config=uvicorn.config.LOGGING_CONFIG) -> tuple[uvicorn.Server, eng.Engine]:
    """The uvicorn server and its engine, not started (`server.run()` loads the runs and serves). A non-loopback
    `host` without an API key is refused here, before anything binds."""
    if not is_loopback(host) and not api_key:
        raise TunelabError(f"--host {host} would let other machines reach the server: give --api-key KEY (or set "
                           f"TUNELAB_API_KEY) so that every request must carry 'Authorization: Bearer KEY', or leave "
                           f"--host at 127.0.0.1.")
    server: uvicorn.Server | None = None

    def loader(ps):
        return eng.load(ps, trust_remote_code, allow_pickle)

    def failed():
        if server is not None:
            server.should_exit = True

    engine = eng.Engine(paths, settings, loader, failed)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, api_key), host=host, port=port, log_config=log_config,
                                           timeout_graceful_shutdown=None))
    return server, engine


def serve(paths, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          settings: eng.Settings | None = None, trust_remote_code: bool = False, allow_pickle: bool = False) -> None:
    """Load `paths` and answer on host:port until SIGTERM / Ctrl-C (in-flight requests finish first); a run that
    fails to load ends it with that run's error."""
    server, engine = build(paths, host, port, api_key, settings, trust_remote_code, allow_pickle)
    # uvicorn re-raises the SIGTERM it caught once it has shut down gracefully; with a handler of ours in place
    # that second signal is a no-op, so a drained server exits 0 rather than dying of the signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    if engine.state == "failed":
        if isinstance(engine.error, TunelabError):
            raise engine.error
        raise TunelabError(f"Loading the runs failed: {type(engine.error).__name__}: {engine.error}")
