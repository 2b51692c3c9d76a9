"""The serving engine, without HTTP (app.py is the HTTP side): the runs loaded once, one worker thread that owns
them, a bounded queue, dynamic batching, and generation's token-by-token decode loop.

Features:
- Runs that share a base model load it once: an adapter run whose base, task and labels match an adapter run
  already loaded is added to it as a named adapter (TunedModel.add_adapter) and switched on per batch.
- One worker thread runs every forward pass (torch is not safe across concurrent forwards on one model); the
  HTTP side only queues jobs and waits on their futures.
- Dynamic batching: the worker takes the oldest job, waits up to `batch_window` seconds from its arrival for
  others of the same model, adapter and endpoint, and runs them as one batch (generation: one left-padded prefill,
  then one token a step from the KV cache, each row sampled with its own settings and seeded generator).
- A prefix cache: prompts that start alike (the chat template's system turn, a conversation sent again with one
  more turn) have the key/value states of the shared start computed once per model and adapter and reused, so a
  request's prefill covers only what is new in it (PrefixCache).
- A bounded queue (`QueueFull` when full), a deadline per job (`Timeout`), a cancel flag a disconnected client
  sets, and a drain on `stop` (jobs queued before it still run).
"""

from __future__ import annotations

import collections
import inspect
import logging
import secrets
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from .. import predict as predict_mod
from ..errors import TunelabError
from ..predict import TunedModel
from ..tasks import causal_lm

log = logging.getLogger("tunelab.serve")

GENERATE, EMBED, PREDICT = "generate", "embed", "predict"


class ClientError(Exception):
    """A request the server cannot answer as asked: the HTTP side turns it into a 4xx OpenAI error."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code = message, param, status, code


class QueueFull(ClientError):
    def __init__(self, size: int):
        super().__init__(f"The server's queue is full ({size} requests waiting); retry after the Retry-After "
                         f"seconds.", status=429, code="queue_full")


class Timeout(ClientError):
    def __init__(self, seconds: float):
        super().__init__(f"The request did not finish within the server's timeout of {seconds:g} s (--timeout).",
                         status=504, code="timeout")


@dataclass
class Settings:
    max_batch: int = 16  # rows a batch holds (generation: prompts x n)
    batch_window: float = 0.01  # seconds the first job of a batch waits for others
    max_queue: int = 64  # jobs waiting; one more is answered 429
    timeout: float = 300.0  # seconds from arrival to answer
    prefix_cache: bool = True  # reuse the key/value states of prompts' shared start (PrefixCache)


@dataclass
class Served:
    """One model id the server answers to: a loaded TunedModel (shared by all adapters of one base), the adapter
    to switch to, and which endpoint kind it gets (from the task's flags)."""

    id: str
    source: Path
    model: TunedModel
    adapter: str
    kind: str
    created: int = field(default_factory=lambda: int(time.time()))


def kind_of(task) -> str:
    return GENERATE if task.GENERATES else EMBED if task.EMBEDS else PREDICT


def model_ids(paths: list[Path]) -> list[str]:
    """Each run's model id: its folder's name. Two runs with one name would make a request ambiguous."""
    ids = [Path(p).resolve().name for p in paths]
    for p in paths:
        if not Path(p).is_dir():
            raise TunelabError(f"'{p}' does not exist or is not a folder; `tunelab serve` takes finished run "
                               f"directories (or plain Hugging Face model folders).")
        if not (Path(p) / "config.yaml").is_file() and not (Path(p) / "config.json").is_file():
            raise TunelabError(f"'{p}' is neither a tunelab run directory (config.yaml) nor a model directory "
                               f"(config.json); pass the output_dir of a finished `tunelab train`.")
    seen = collections.Counter(ids)
    twice = [i for i, n in seen.items() if n > 1]
    if twice:
        clash = [str(p) for p, i in zip(paths, ids) if i == twice[0]]
        raise TunelabError(f"Two runs would be served as the model id '{twice[0]}' ({', '.join(clash)}): a model id "
                           f"is the run's folder name. Copy or link one of them under another name.")
    return ids


def load(paths: list[Path], trust_remote_code: bool = False, allow_pickle: bool = False,
         device: str | None = None) -> dict[str, Served]:
    """Every run, loaded once per base: {model id: Served}. A multi-task run gives one id per task, 'folder/task'."""
    switches = dict(trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    served: dict[str, Served] = {}
    hosts: list[tuple[TunedModel, object, dict]] = []  # adapter runs loaded so far: (model, config, labels info)
    for path, name in zip(map(Path, paths), model_ids(paths)):
        if not (path / "config.yaml").is_file():
            model = TunedModel.from_model_dir(path, device, **switches)
            served[name] = Served(name, path, model, "default", kind_of(model.task))
            continue
        cfg, info = predict_mod.read_run(path)
        if cfg.tasks is not None:
            for task in info["tasks"]:
                model = predict_mod.load(path, device, task, **switches)
                served[f"{name}/{task}"] = Served(f"{name}/{task}", path, model, "default", kind_of(model.task))
            continue
        host = next((m for m, c, i in hosts if shares_base(c, i, cfg, info)), None)
        if host is not None:
            host.add_adapter(name, path)
            served[name] = Served(name, path, host, name, kind_of(host.task))
            continue
        model = predict_mod.load(path, device, **switches)
        served[name] = Served(name, path, model, "default", kind_of(model.task))
        if cfg.method.SWITCHABLE and not cfg.method.VIRTUAL_TOKENS:
            hosts.append((model, cfg, info))
    return served


def shares_base(host_cfg, host_info: dict, cfg, info: dict) -> bool:
    """Whether a run can be added as a named adapter to a loaded one: both keep adapters apart from one base, for
    one task with one label set (one head shape). Virtual-token runs load on their own (their hooks hold one
    encoder per model kind)."""
    return (cfg.method.SWITCHABLE and not cfg.method.VIRTUAL_TOKENS and cfg.task.type == host_cfg.task.type
            and info == host_info and predict_mod.base_of(cfg.model) == predict_mod.base_of(host_cfg.model))


# -- jobs ----------------------------------------------------------------------------------------------------------

@dataclass
class Job:
    """One request's work. `payload` by kind: generate {"prompts": [messages or text], "chat": bool, "max_tokens",
    "temperature", "top_p", "seed", "stop", "n"}; embed {"texts"}; predict {"items", "pairs"}. `on_event` (from
    the worker thread) gets generation's ("delta", choice, text) and ("finish", choice, reason) as they happen;
    `accepted` resolves once the prompts are checked (their token counts), `result` at the end."""

    served: Served
    kind: str
    payload: dict
    on_event: object = None
    arrived: float = field(default_factory=time.monotonic)
    deadline: float = 0.0
    cancelled: bool = False
    accepted: Future = field(default_factory=Future)
    result: Future = field(default_factory=Future)

    def key(self) -> tuple:
        """Jobs that may share a batch: one loaded model, one adapter, one endpoint (predict: pairs or not)."""
        return (id(self.served.model), self.served.adapter, self.kind, self.payload.get("pairs") is not None)

    def rows(self) -> int:
        p = self.payload
        return len(p["prompts"]) * p["n"] if self.kind == GENERATE else len(p.get("texts") or p.get("items") or [1])

    def fail(self, error: BaseException) -> None:
        for f in (self.accepted, self.result):
            if not f.done():
                f.set_exception(error)


class Engine:
    """The worker thread and its queue. `start()` loads the runs in the worker (state "loading", then "ready", or
    "failed" with `error` set and `on_fail` called); `submit(job)` queues; `stop()` drains and joins."""

    def __init__(self, paths: list[Path], settings: Settings | None = None, loader=None, on_fail=None):
        self.paths, self.settings = [Path(p) for p in paths], settings or Settings()
        self.ids = model_ids(self.paths)  # bad paths and clashing names are refused before anything loads
        self.loader, self.on_fail = loader or load, on_fail
        self.models: dict[str, Served] = {}
        self.state, self.error = "loading", None
        self.pending: collections.deque[Job] = collections.deque()
        self.cond = threading.Condition()
        self.stopping = False
        self.batches: collections.deque[int] = collections.deque(maxlen=1000)  # rows of each batch run, newest last
        self.cancelled: collections.deque[int] = collections.deque(maxlen=1000)  # tokens of each row a client left
        self.prefixes = PrefixCache()
        self.thread = threading.Thread(target=self.work, name="tunelab-serve-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join()

    def submit(self, job: Job) -> Job:
        with self.cond:
            if self.stopping:
                raise ClientError("The server is shutting down.", status=503, code="shutting_down")
            if len(self.pending) >= self.settings.max_queue:
                raise QueueFull(self.settings.max_queue)
            job.deadline = job.arrived + self.settings.timeout
            self.pending.append(job)
            self.cond.notify_all()
        return job

    def work(self) -> None:
        try:
            self.models = self.loader(self.paths)
        except Exception as e:  # noqa: BLE001 - reported by the caller (a TunelabError as its message)
            self.state, self.error = "failed", e
            if not isinstance(e, TunelabError):
                log.exception("loading the runs failed")
            if self.on_fail:
                self.on_fail()
            return
        self.state = "ready"
        log.info("serving %s", ", ".join(self.models))
        while True:
            batch = self.next_batch()
            if batch is None:
                return
            try:
                self.run(batch)
            except Exception as e:  # noqa: BLE001 - one batch's failure must not stop the server
                log.exception("a batch failed")
                for job in batch:
                    job.fail(e)

    def next_batch(self) -> list[Job] | None:
        """The oldest job and those of its kind that arrive within the batch window, up to max_batch rows."""
        s = self.settings
        with self.cond:
            while not self.pending:
                if self.stopping:
                    return None
                self.cond.wait()
            first = self.pending[0]
            while not self.stopping:
                rows = sum(j.rows() for j in self.pending if j.key() == first.key())
                left = first.arrived + s.batch_window - time.monotonic()
                if rows >= s.max_batch or left <= 0:
                    break
                self.cond.wait(left)
            batch, rows, keep = [], 0, collections.deque()
            for job in self.pending:
                if job.key() == first.key() and (not batch or rows + job.rows() <= s.max_batch):
                    batch.append(job)
                    rows += job.rows()
                else:
                    keep.append(job)
            self.pending = keep
        now = time.monotonic()
        live = []
        for job in batch:
            if job.cancelled:
                job.fail(ClientError("cancelled", status=499))
            elif now > job.deadline:
                job.fail(Timeout(s.timeout))
            else:
                live.append(job)
        return live

    def run(self, batch: list[Job]) -> None:
        if not batch:
            return
        self.batches.append(sum(job.rows() for job in batch))
        served = batch[0].served
        model = served.model
        if served.adapter in model.adapters and len(model.adapters) > 1:
            model.set_adapter(served.adapter)
        if batch[0].kind == GENERATE:
            self.generate(model, batch)
        elif batch[0].kind == EMBED:
            self.share(batch, lambda jobs: embed(model, jobs))
        else:
            self.share(batch, lambda jobs: predict(model, jobs))

    @staticmethod
    def share(batch: list[Job], run) -> None:
        """One forward pass for the batch's inputs; if some input is refused, each job again on its own, so only
        the job at fault gets the error."""
        try:
            results = run(batch)
        except TunelabError as e:
            if len(batch) == 1:
                batch[0].fail(ClientError(str(e), param="input"))
                return
            for job in batch:
                Engine.share([job], run)
            return
        for job, r in zip(batch, results):
            job.accepted.set_result(None)
            job.result.set_result(r)

    def generate(self, model: TunedModel, batch: list[Job]) -> None:
        rows = []
        for job in batch:
            try:
                prepared = prepare_prompts(model, job.payload)
            except ClientError as e:
                job.fail(e)
                continue
            except TunelabError as e:  # e.g. a template that cannot render these messages
                job.fail(ClientError(str(e), "messages" if job.payload["chat"] else "prompt"))
                continue
            job.accepted.set_result([len(ids) for ids, _ in prepared])
            job.choices = []
            for p, (ids, max_tokens) in enumerate(prepared):
                for k in range(job.payload["n"]):
                    index = p * job.payload["n"] + k
                    row = Row(job, index, ids, max_tokens, job.payload, model.tokenizer, k)
                    job.choices.append(row)
                    rows.append(row)
        if rows:
            prefix = None
            if self.settings.prefix_cache and not model.cfg.method.VIRTUAL_TOKENS:
                prefix = self.prefixes.find(model.model, batch[0].served.adapter, [r.ids for r in rows])
            decode(model.model, rows, model.tokenizer.eos_token_id, model.tokenizer.pad_token_id, model.device,
                   lambda job: self.settle(job), prefix)
        self.cancelled.extend(r.count for r in rows if r.finish_reason == "cancelled")

    def settle(self, job: Job) -> None:
        """Answer a generation job once its last row has ended, while the batch's other rows go on."""
        if job.result.done() or not all(r.done for r in job.choices):
            return
        if any(r.finish_reason == "timeout" for r in job.choices):
            job.fail(Timeout(self.settings.timeout))
            return
        job.result.set_result({"prompt_tokens": sum(job.accepted.result()),
                               "choices": [{"index": r.index, "text": r.final, "finish_reason": r.finish_reason,
                                            "tokens": r.count} for r in job.choices]})


def embed(model: TunedModel, jobs: list[Job]) -> list[dict]:
    texts = [t for job in jobs for t in job.payload["texts"]]
    vectors = model.embed(texts)
    limit = model.cfg.data.max_length
    counts = [min(len(ids), limit) for ids in model.tokenizer(texts)["input_ids"]]
    out, start = [], 0
    for job in jobs:
        n = len(job.payload["texts"])
        out.append({"vectors": vectors[start:start + n], "prompt_tokens": sum(counts[start:start + n])})
        start += n
    return out


def predict(model: TunedModel, jobs: list[Job]) -> list[list[dict]]:
    items = [x for job in jobs for x in job.payload["items"]]
    pairs = jobs[0].payload["pairs"]
    if pairs is not None:
        pairs = [x for job in jobs for x in job.payload["pairs"]]
        preds = model.predict(items, pairs=pairs)
    else:
        preds = model.predict(items)
    out, start = [], 0
    for job in jobs:
        n = len(job.payload["items"])
        out.append(preds[start:start + n])
        start += n
    return out


# -- generation ----------------------------------------------------------------------------------------------------

def prepare_prompts(model: TunedModel, payload: dict) -> list[tuple[list[int], int]]:
    """(prompt token ids, max new tokens) per prompt: chat messages rendered with the run's template (its
    generation_prompt, as `tunelab generate` does), plain completions' text as it is. A prompt that leaves no room
    for a reply, or a max_tokens past the room left, is refused with the limits, not cut."""
    out = []
    limit = causal_lm.generation_limit(model.model, model.tokenizer)
    for i, prompt in enumerate(payload["prompts"]):
        text = model.task.generation_prompt(prompt, None, model.tokenizer, model.info) if payload["chat"] else prompt
        ids = causal_lm.prompt_ids(text, model.tokenizer, model.info)
        where = "messages" if payload["chat"] else ("prompt" if len(payload["prompts"]) == 1 else f"prompt[{i}]")
        if not ids:
            raise ClientError(f"{where} is empty after rendering: give some text to continue.", where)
        room = limit - len(ids)
        if room < 1:
            raise ClientError(f"This model's maximum context length is {limit} tokens, and {where} is {len(ids)} "
                              f"tokens, which leaves no room for a reply. Shorten it.", where,
                              code="context_length_exceeded")
        want = payload["max_tokens"]
        if want is not None and want > room:
            raise ClientError(f"max_tokens={want} is too large: this model's maximum context length is {limit} tokens "
                              f"and {where} takes {len(ids)}, so at most {room} tokens can be generated.",
                              "max_tokens", code="context_length_exceeded")
        out.append((ids, want or room))
    return out


class Row:
    """One reply being written: its tokens, its text so far (stripped as `tunelab generate` strips it), what has
    been sent of it, and why it stopped."""

    def __init__(self, job: Job, index: int, ids: list[int], max_tokens: int, payload: dict, tokenizer, k: int):
        self.job, self.index, self.ids, self.max_tokens, self.tokenizer = job, index, ids, max_tokens, tokenizer
        self.temperature, self.top_p = payload["temperature"], payload["top_p"]
        self.stops = [s for s in payload["stop"] if s]
        self.tokens: list[int] = []
        self.sent, self.final, self.finish_reason, self.count = "", "", None, 0
        self.generator = None
        if self.temperature > 0:
            seed = payload["seed"] if payload["seed"] is not None else secrets.randbits(63)
            self.generator = torch.Generator().manual_seed(hash((seed, index)) & ((1 << 63) - 1))  # one stream a choice

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def pick(self, logits: torch.Tensor, greedy: int) -> int:
        """`greedy` (the batch's argmax for this row) at temperature 0; else temperature, then nucleus (top_p),
        sampled with this row's generator."""
        if self.generator is None:
            return greedy
        logits = logits.float().cpu() / self.temperature
        if self.top_p < 1.0:
            sorted_logits, order = logits.sort(descending=True)
            probs = sorted_logits.softmax(-1)
            # Keep the smallest set whose mass reaches top_p (the first token always).
            drop = probs.cumsum(-1) - probs >= self.top_p
            logits[order[drop]] = float("-inf")
        return int(torch.multinomial(logits.softmax(-1), 1, generator=self.generator))

    def push(self, token: int, eos: int | None) -> None:
        """Take one generated token: stop at EOS (not counted, as OpenAI counts), a stop string, max_tokens, the
        deadline or a cancel; send the text that can no longer change."""
        if self.job.cancelled:
            self.finish_reason = "cancelled"
            return
        if token == eos:
            self.finish("stop")
            return
        self.tokens.append(token)
        self.count += 1
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).lstrip()
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.finish("stop", text[:cut])
            return
        if self.count >= self.max_tokens:
            self.finish("length", text)
            return
        if time.monotonic() > self.job.deadline:
            self.finish_reason = "timeout"
            return
        # Hold back what may still change: trailing space (stripped at the end), a half-decoded character, and an
        # ending that could be the start of a stop string.
        safe = text.rstrip().rstrip("\ufffd")
        for s in self.stops:
            for k in range(min(len(s) - 1, len(safe)), 0, -1):
                if safe.endswith(s[:k]):
                    safe = safe[:-k]
                    break
        self.send(safe)

    def finish(self, reason: str, text: str | None = None) -> None:
        if text is None:
            text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        self.final = text.strip()
        self.send(self.final)
        self.finish_reason = reason
        if self.job.on_event:
            self.job.on_event(("finish", self.index, reason))

    def send(self, text: str) -> None:
        if len(text) > len(self.sent) and text.startswith(self.sent):
            if self.job.on_event:
                self.job.on_event(("delta", self.index, text[len(self.sent):]))
            self.sent = text


# -- the prefix cache ----------------------------------------------------------------------------------------------

def shared_start(a: list[int], b: list[int]) -> int:
    """How many leading tokens two prompts have in common."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Prefix:
    """The key/value states of a prompt start: one (keys, values) pair per layer, batch 1, for `ids`."""

    def __init__(self, ids: list[int], layers: list[tuple[torch.Tensor, torch.Tensor]]):
        self.ids, self.layers = ids, layers

    def cache(self, length: int, rows: int, config) -> DynamicCache:
        """A fresh cache holding the first `length` tokens' states for `rows` rows; the stored tensors stay as they
        are (a cache grows by concatenation, which copies)."""
        cache = DynamicCache(config=config)
        for i, (k, v) in enumerate(self.layers):
            cache.update(k[:, :, :length].expand(rows, -1, -1, -1), v[:, :, :length].expand(rows, -1, -1, -1), i)
        return cache


class PrefixCache:
    """The longest prompt start worth keeping, per loaded model and adapter, with its key/value states.

    A batch reuses the kept start as far as all its prompts begin with it. When there is none worth reusing, the
    start this batch's prompts share (a batch of one: the start it shares with the previous prompt) is computed on its
    own first, kept, and reused for the rest; the prefill then covers each prompt's remainder only, so the work is the
    same as without the cache the first time and less every time after. A start shorter than `min_tokens` is not worth
    a separate forward pass; one past `max_tokens` is cut there (its states are memory: SmolLM2-135M keeps 46 KB a
    token). Models whose cache is not plain full attention (sliding windows, recurrent state) are left alone."""

    def __init__(self, min_tokens: int = 16, max_tokens: int = 4096):
        self.min_tokens, self.max_tokens = min_tokens, max_tokens
        self.kept: dict[tuple, Prefix] = {}
        self.previous: dict[tuple, list[int]] = {}
        self.unsupported: set[int] = set()
        self.reused = 0  # prompt tokens whose prefill the cache saved

    def find(self, model, adapter: str, prompts: list[list[int]]) -> tuple[Prefix, int] | None:
        """(kept start, how many of its tokens every prompt begins with), or None. Every prompt keeps at least one
        token of its own to prefill: its last position's logits give the reply's first token."""
        key = (id(model), adapter)
        if id(model) in self.unsupported:
            return None
        room = min(len(p) for p in prompts) - 1
        shared = min(len(prompts[0]), self.max_tokens)
        for p in prompts[1:]:
            shared = min(shared, shared_start(prompts[0], p))
        if len(prompts) == 1:
            shared = min(shared, shared_start(prompts[0], self.previous.get(key, [])))
        self.previous[key] = prompts[0]
        kept = self.kept.get(key)
        have = min([shared_start(kept.ids, p) for p in prompts] + [room]) if kept is not None else 0
        want = min(shared, room, self.max_tokens)
        if want >= self.min_tokens and want >= have + self.min_tokens:
            kept = self.compute(model, prompts[0][:want], kept, have)
            if kept is None:
                return None
            self.kept[key] = kept
            have = want
        if have < self.min_tokens:
            return None
        self.reused += have * len(prompts)
        return kept, have

    @torch.inference_mode()
    def compute(self, model, ids: list[int], kept: Prefix | None, have: int) -> Prefix | None:
        """The states of `ids`, continuing from the first `have` tokens of `kept` where that helps."""
        device = next(model.parameters()).device
        past = kept.cache(have, 1, model.config) if kept is not None and have else None
        start = have if past is not None else 0
        out = model(input_ids=torch.tensor([ids[start:]], device=device), past_key_values=past, use_cache=True,
                    **keep_last(model))
        cache = out.past_key_values
        if type(cache) is not DynamicCache or not all(type(layer) is DynamicLayer for layer in cache.layers):
            self.unsupported.add(id(model))
            return None
        return Prefix(ids, [(layer.keys, layer.values) for layer in cache.layers])


def keep_last(model) -> dict:
    # Only the last position's logits are read: a long prompt's (batch, width, vocab) logits would be memory for nothing.
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


@torch.inference_mode()
def decode(model, rows: list[Row], eos: int | None, pad: int | None, device, settle,
           prefix: tuple[Prefix, int] | None = None) -> None:
    """Write every row's reply together: one left-padded prefill, then one token a step from the KV cache (the
    inputs transformers' generate gives a decoder: position ids counted over the mask, the mask grown by one each
    step, so virtual-token hooks see what they see there). With a `prefix` (its states, and how many tokens every
    row begins with), the prefill starts after those tokens from a copy of their states: the mask reads
    [prefix | left padding | rest of the prompt]. A row that ends leaves the batch (its cache rows too), and
    `settle(job)` answers its job as soon as the job's last row has ended."""
    pad = pad if pad is not None else (eos if eos is not None else 0)
    start = prefix[1] if prefix is not None else 0
    width = max(len(r.ids) for r in rows) - start
    ids = torch.tensor([[pad] * (width - len(r.ids) + start) + r.ids[start:] for r in rows], device=device)
    mask = torch.tensor([[1] * start + [0] * (width - len(r.ids) + start) + [1] * (len(r.ids) - start) for r in rows],
                        device=device)
    positions = ((mask.cumsum(-1) - 1).masked_fill(mask == 0, 0))[:, start:]
    cache = prefix[0].cache(start, len(rows), model.config) if prefix is not None else None
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
                **keep_last(model))
    steps = max(r.max_tokens for r in rows)
    for _ in range(steps):
        logits = out.logits[:, -1]
        greedy = logits.argmax(-1).tolist()  # one device sync a step for every greedy row
        nxt = []
        for i, r in enumerate(rows):
            nxt.append(r.pick(logits[i], greedy[i]))
            r.push(nxt[-1], eos)
            if r.done:
                settle(r.job)
        live = [i for i, r in enumerate(rows) if not r.done]
        if not live:
            return
        cache = out.past_key_values
        if len(live) < len(rows):
            keep = torch.tensor(live, device=device)
            cache.batch_select_indices(keep)
            rows, nxt, mask, positions = [rows[i] for i in live], [nxt[i] for i in live], mask[keep], positions[keep]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
        positions = positions[:, -1:] + 1
        out = model(input_ids=torch.tensor(nxt, device=device)[:, None], attention_mask=mask, position_ids=positions,
                    past_key_values=cache, use_cache=True)
    for r in rows:  # unreachable in practice (max_tokens ends each row), kept so no row is left without an end
        if not r.done:
            r.finish("length")
            settle(r.job)
