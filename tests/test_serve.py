"""`tunelab serve` through OpenAI's own Python client, against a server on a loopback port that the tests start and
stop: the same replies as `tunelab generate`, streamed and not, the same vectors as `tunelab embed`, the same
predictions as `tunelab predict`, adapters sharing one base, dynamic batching under 32 clients, the queue's 429,
timeouts, every client mistake as OpenAI's error JSON (and the server serving on), the API key, and a SIGTERM
that lets the request in flight finish."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from conftest import make_chat_rows, make_rows, tol, write_jsonl

import tunelab
from tunelab.serve import app as serve_app
from tunelab.serve import engine as serve_engine
from tunelab.tasks import causal_lm

QUESTIONS = [f"What is the opposite of {w}?" for w in ("hot", "big", "up", "good", "fast", "light")]
CONVERSATIONS = [[{"role": "user", "content": q}] for q in QUESTIONS] + [
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is the opposite of old?"}],
    [{"role": "user", "content": "What is the opposite of high?"}, {"role": "assistant", "content": "Low."},
     {"role": "user", "content": "What is the opposite of early?"}],
]
NEW_TOKENS = 12


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_chat_llama, tiny_bert) -> dict[str, Path]:
    """Two LoRA sft runs on one tiny Llama (to share its base), an embedding run and a classifier, trained briefly."""
    d = tmp_path_factory.mktemp("serve")
    chat = write_jsonl(d / "chat.jsonl", make_chat_rows(160, seed=3))
    quick = ["eval.base=false", "eval.forgetting=none", "eval.samples=0"]
    out = {}
    for name, seed in (("sft", 1), ("sft2", 2)):
        out[name] = tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={chat}", "task.type=sft",
                                         "data.dedupe=false", "data.max_length=64", "train.batch_size=8",
                                         "train.lr=1e-2", "method.name=lora", "method.target_modules=all-linear",
                                         "train.max_steps=40", f"train.seed={seed}", *quick,
                                         f"output_dir={d / name}"]).dir
    out["prefix"] = tunelab.train(None, [f"model.path={tiny_chat_llama}", f"data.train={chat}", "task.type=sft",
                                         "data.dedupe=false", "data.max_length=64", "train.batch_size=8",
                                         "train.lr=1e-3", "method.name=prefix", "method.num_virtual_tokens=4",
                                         "train.max_steps=2", *quick, f"output_dir={d / 'prefix'}"]).dir
    pairs = write_jsonl(d / "pairs.jsonl", [{"anchor": r["text"], "positive": r["text"]} for r in make_rows(24, seed=5)])
    out["emb"] = tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={pairs}", "task.type=embedding",
                                      "method.name=lora", "train.max_steps=1", *quick, f"output_dir={d / 'emb'}"]).dir
    labelled = write_jsonl(d / "labelled.jsonl", make_rows(64, seed=0))
    out["clf"] = tunelab.train(None, [f"model.path={tiny_bert}", f"data.train={labelled}", "method.name=lora",
                                      "train.max_steps=2", "eval.linear_probe=false", *quick,
                                      f"output_dir={d / 'clf'}"]).dir
    return out


class Running:
    """A server in a background thread of this process (uvicorn installs no signal handlers off the main thread)."""

    def __init__(self, paths, settings: serve_engine.Settings):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # log_config None: uvicorn's loggers propagate to the root logger, where caplog sees them
        self.server, self.engine = serve_app.build(paths, port=self.port, settings=settings, log_config=None)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_ready(self.url)

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **kw)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def wait_ready(url: str, headers: dict | None = None, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + 120
    seen = []
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            r = httpx.get(f"{url}/health", headers=headers)
            seen.append(r.json())
            if r.status_code == 200:
                assert r.json() == {"status": "ready"}
                return
            assert r.status_code == 503 and r.json() == {"status": "loading"}, r.text
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the server never became ready: {seen[-3:]}")


@pytest.fixture(scope="module")
def server(runs, tiny_chat_llama):
    running = Running([runs["sft"], runs["sft2"], runs["prefix"], runs["emb"], runs["clf"], tiny_chat_llama],
                      serve_engine.Settings(max_batch=16, batch_window=0.02, max_queue=64, timeout=120))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def expected(runs, tiny_chat_llama) -> dict:
    """What `tunelab generate` replies (through its own command), and generate_replies' token counts and prompt
    lengths, for each sft run."""
    from typer.testing import CliRunner

    from tunelab import cli

    out = {}
    for name in ("sft", "sft2"):
        prompts = runs[name].parent / f"{name}-prompts.jsonl"
        write_jsonl(prompts, [{"messages": c} for c in CONVERSATIONS])
        r = CliRunner().invoke(cli.app, ["generate", str(runs[name]), "--input", str(prompts), "--max-new-tokens",
                                         str(NEW_TOKENS)])
        assert r.exit_code == 0, r.output
        replies = [json.loads(line)["response"] for line in r.stdout.splitlines() if line.startswith("{")]
        model = tunelab.load(runs[name])
        texts = [model.task.generation_prompt(c, None, model.tokenizer, model.info) for c in CONVERSATIONS]
        counted = causal_lm.generate_replies(model.model, model.tokenizer, texts, model.info, NEW_TOKENS, batch_size=1)
        assert [c["reply"] for c in counted] == replies
        out[name] = {"replies": replies, "texts": texts, "tokens": [c["tokens"] for c in counted],
                     "ended": [c["ended"] for c in counted],
                     "prompt_tokens": [len(causal_lm.prompt_ids(t, model.tokenizer, model.info)) for t in texts]}
    assert out["sft"]["replies"] != out["sft2"]["replies"]  # two adapters that answer differently
    assert len(set(out["sft"]["replies"])) > 1  # replies that depend on the prompt
    return out


def chat(client, model, messages, **kw):
    return client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=NEW_TOKENS, **kw)


# -- answers -------------------------------------------------------------------------------------------------------

def test_greedy_chat_completions_equal_tunelab_generate_with_usage(server, expected):
    client = server.client()
    for name in ("sft", "sft2"):
        for i, conversation in enumerate(CONVERSATIONS):
            r = chat(client, name, conversation)
            want = expected[name]
            assert r.choices[0].message.content == want["replies"][i]
            assert r.choices[0].finish_reason == ("stop" if want["ended"][i] else "length")
            assert r.usage.prompt_tokens == want["prompt_tokens"][i]
            assert r.usage.completion_tokens == want["tokens"][i]  # EOS not counted
            assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
            assert r.model == name and r.object == "chat.completion"


def test_a_plain_model_folder_is_served_as_tunelab_generate_reads_it(server, tiny_chat_llama, cli_run, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": c} for c in CONVERSATIONS[:3]])
    r = cli_run("generate", tiny_chat_llama, "--input", prompts, "--max-new-tokens", NEW_TOKENS)
    assert r.code == 0, r.err
    want = [json.loads(line)["response"] for line in r.out.splitlines()]
    client = server.client()
    assert [chat(client, "tiny-chat-llama", c).choices[0].message.content for c in CONVERSATIONS[:3]] == want


def test_streamed_chunks_concatenate_to_the_same_reply(server, expected):
    client = server.client()
    for i, conversation in enumerate(CONVERSATIONS[:4]):
        chunks = list(chat(client, "sft", conversation, stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == expected["sft"]["replies"][i]
        content = [c for c in chunks if c.choices and c.choices[0].delta.content]
        assert len(content) > 1  # token by token, not one piece at the end
        finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finals == ["stop" if expected["sft"]["ended"][i] else "length"]
        assert chunks[-1].usage.completion_tokens == expected["sft"]["tokens"][i]
    raw = httpx.post(f"{server.url}/v1/chat/completions", json={"model": "sft", "messages": CONVERSATIONS[0],
                                                                 "temperature": 0, "stream": True})
    lines = [line for line in raw.text.split("\n\n") if line]
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"


def test_completions_continue_the_text_as_given(server, expected):
    client = server.client()
    r = client.completions.create(model="sft", prompt=expected["sft"]["texts"][0], temperature=0, max_tokens=NEW_TOKENS)
    assert r.choices[0].text == expected["sft"]["replies"][0]
    assert r.usage.prompt_tokens == expected["sft"]["prompt_tokens"][0]
    streamed = client.completions.create(model="sft", prompt=expected["sft"]["texts"][1], temperature=0,
                                         max_tokens=NEW_TOKENS, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected["sft"]["replies"][1]


def test_a_virtual_token_run_in_a_left_padded_batch_writes_what_tunelab_generate_writes(server, runs):
    """Prefix tuning's key/value prefix sits in front of the pads; texts of four lengths, sent at once."""
    texts = ["hot cold big", "The opposite of up is", "small", "What is the opposite of fast? The opposite of"]
    model = tunelab.load(runs["prefix"])
    want = causal_lm.generate(model.model, model.tokenizer, texts, model.info, NEW_TOKENS)
    assert len(set(want)) == len(want) and all(want)
    client = server.client()
    with ThreadPoolExecutor(len(texts)) as pool:
        got = list(pool.map(lambda t: client.completions.create(model="prefix", prompt=t, temperature=0,
                                                                  max_tokens=NEW_TOKENS).choices[0].text, texts))
    assert got == want
    batched = client.completions.create(model="prefix", prompt=texts, temperature=0, max_tokens=NEW_TOKENS)
    assert [c.text for c in sorted(batched.choices, key=lambda c: c.index)] == want  # one request, one batch
    # A stop string that ends some rows early: they leave the batch (and its cache) while the others go on.
    stop = want[1].split()[0]
    cut = [w[:w.find(stop)].strip() if stop in w else w for w in want]
    assert cut != want and any(c == w for c, w in zip(cut, want))
    batched = client.completions.create(model="prefix", prompt=texts, temperature=0, max_tokens=NEW_TOKENS, stop=stop)
    assert [c.text for c in sorted(batched.choices, key=lambda c: c.index)] == cut


def test_sampling_is_seeded_per_request_and_stop_strings_cut_the_reply(server, expected):
    client = server.client()
    kw = dict(model="sft", messages=CONVERSATIONS[0], temperature=1.0, top_p=0.9, max_tokens=NEW_TOKENS, n=3)
    a = client.chat.completions.create(seed=7, **kw)
    b = client.chat.completions.create(seed=7, **kw)
    c = client.chat.completions.create(seed=8, **kw)
    replies = [x.message.content for x in a.choices]
    assert [x.index for x in a.choices] == [0, 1, 2]
    assert replies == [x.message.content for x in b.choices]
    assert replies != [x.message.content for x in c.choices]
    assert a.usage.completion_tokens <= 3 * NEW_TOKENS
    reply = expected["sft"]["replies"][0]
    stop = reply.split()[1]  # the reply's second word
    cut = chat(client, "sft", CONVERSATIONS[0], stop=[stop, "never there"])
    assert cut.choices[0].message.content == reply[:reply.index(stop)].strip()
    assert cut.choices[0].finish_reason == "stop"
    streamed = chat(client, "sft", CONVERSATIONS[0], stop=stop, stream=True)
    assert "".join(x.choices[0].delta.content or "" for x in streamed) == cut.choices[0].message.content


def test_embeddings_equal_tunelab_embed(server, runs, cli_run, tmp_path):
    texts = [r["text"] for r in make_rows(5, seed=11)]
    write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in texts])
    r = cli_run("embed", runs["emb"], "--input", tmp_path / "texts.jsonl", "--output", tmp_path / "v.npy")
    assert r.code == 0, r.err
    want = np.load(tmp_path / "v.npy")
    got = server.client().embeddings.create(model="emb", input=texts)  # the client asks for base64
    assert [d.index for d in got.data] == list(range(len(texts)))
    np.testing.assert_allclose(np.array([d.embedding for d in got.data]), want, rtol=0, atol=1e-5)
    plain = httpx.post(f"{server.url}/v1/embeddings", json={"model": "emb", "input": texts[0],
                                                             "encoding_format": "float"}).json()
    np.testing.assert_allclose(plain["data"][0]["embedding"], want[0], rtol=0, atol=1e-5)
    assert plain["usage"]["prompt_tokens"] > 0 and plain["object"] == "list"


def test_predict_equals_tunelab_predict(server, runs, cli_run):
    texts = ["a great and moving film", "boring and tedious plot", "the cast was charming"]
    r = cli_run("predict", runs["clf"], *[x for t in texts for x in ("--text", t)])
    assert r.code == 0, r.err
    want = [json.loads(line) for line in r.out.splitlines()]
    got = httpx.post(f"{server.url}/v1/predict", json={"model": "clf", "input": texts}).json()
    assert got["object"] == "list" and got["model"] == "clf"
    assert [p["label"] for p in got["data"]] == [p["label"] for p in want]
    for g, w in zip(got["data"], want):
        assert set(g) == set(w) and g["text"] == w["text"]
        for label, p in w["probs"].items():
            assert g["probs"][label] == pytest.approx(p, abs=tol(1.0, 64))  # a batch of 3 vs the CLI's batch


def test_models_lists_each_run_by_folder_name_and_adapters_share_one_base(server):
    listed = server.client().models.list().data
    assert [m.id for m in listed] == ["sft", "sft2", "prefix", "emb", "clf", "tiny-chat-llama"]
    m = server.engine.models
    assert m["sft"].model is m["sft2"].model and m["sft"].adapter != m["sft2"].adapter
    assert m["prefix"].model is not m["sft"].model  # virtual tokens: loaded on their own
    assert m["emb"].model is not m["clf"].model  # another task: loaded on its own
    assert httpx.get(f"{server.url}/docs").status_code == 200
    assert "/v1/chat/completions" in httpx.get(f"{server.url}/openapi.json").json()["paths"]


def test_32_concurrent_clients_all_get_their_own_answers(server, expected):
    """Greedy requests of two adapters and sampled ones at once: batches form, and no greedy reply depends on its
    batch-mates (left padding, another adapter's rows, sampled rows)."""
    client = server.client(http_client=httpx.Client(limits=httpx.Limits(max_connections=32)))
    before = len(server.engine.batches)

    def one(k: int):
        name, i = ("sft", "sft2")[k % 2], k % len(CONVERSATIONS)
        if k % 5 == 4:  # a sampled batch-mate
            r = client.chat.completions.create(model=name, messages=CONVERSATIONS[i], temperature=1.0, seed=k,
                                               max_tokens=NEW_TOKENS)
            return None, r.usage.completion_tokens <= NEW_TOKENS
        return expected[name]["replies"][i], chat(client, name, CONVERSATIONS[i]).choices[0].message.content

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    for want, got in results:
        assert got is True if want is None else got == want
    assert max(list(server.engine.batches)[before:]) > 1  # requests shared forward passes


SYSTEM = ("You answer questions about opposites with one short sentence, the way the examples you were trained on "
          "answer them, and nothing else.")


@pytest.fixture(scope="module")
def sharp_llama(tiny_chat_llama, tmp_path_factory) -> Path:
    """tiny_chat_llama's architecture and tokenizer with weights drawn 10x wider: attention that is far from uniform
    and logits a few units apart, so that a key out of place or a position off by one changes the greedy reply,
    where the fixture's near-uniform attention would hide it."""
    import shutil

    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("sharp") / "sharp-llama"
    shutil.copytree(tiny_chat_llama, path)
    config = AutoConfig.from_pretrained(path)
    config.initializer_range = 0.2
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_prompts_that_start_alike_reuse_the_start_and_reply_as_tunelab_generate_does(sharp_llama):
    """A system turn every request shares, and a conversation sent again with one more turn: the prefix cache computes
    the shared start once and prefills only the rest (the mask then reads [start | padding | rest]), alone and in
    left-padded batches; every greedy reply is what `tunelab generate` writes, and seeded sampling draws the same
    tokens with the cache as without it."""
    conversations = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in QUESTIONS]
    longer = conversations[0] + [{"role": "assistant", "content": "The opposite of hot is cold."},
                                 {"role": "user", "content": "And the opposite of early?"}]
    conversations.append(longer)
    model = tunelab.TunedModel.from_model_dir(sharp_llama)
    texts = [model.task.generation_prompt(c, None, model.tokenizer, model.info) for c in conversations]
    want = [c["reply"] for c in causal_lm.generate_replies(model.model, model.tokenizer, texts, model.info, NEW_TOKENS,
                                                          batch_size=1)]
    assert len(set(want)) > 2  # replies that turn on what follows the shared start
    server = Running([sharp_llama], serve_engine.Settings(max_batch=8, batch_window=0.05, timeout=120))
    try:
        cache, settings = server.engine.prefixes, server.engine.settings
        system_tokens = len(causal_lm.prompt_ids(texts[0], model.tokenizer, model.info)) - 12
        assert system_tokens >= cache.min_tokens  # the shared start is long enough to be kept
        client = server.client(http_client=httpx.Client(limits=httpx.Limits(max_connections=8)))

        def greedy(c):
            return chat(client, "sharp-llama", c).choices[0].message.content

        def sampled(c, k):
            return client.chat.completions.create(model="sharp-llama", messages=c, temperature=1.0, seed=k,
                                                  max_tokens=NEW_TOKENS).choices[0].message.content

        assert [greedy(c) for c in conversations] == want
        assert cache.reused >= system_tokens * (len(conversations) - 1)  # all but the first reused the start
        with ThreadPoolExecutor(8) as pool:  # batches of prompts of different lengths after the shared start
            batches = len(server.engine.batches)
            assert list(pool.map(greedy, conversations)) == want
            assert max(list(server.engine.batches)[batches:]) > 1
            with_cache = list(pool.map(sampled, conversations, range(len(conversations))))
            settings.prefix_cache = False
            reused = cache.reused
            without = list(pool.map(sampled, conversations, range(len(conversations))))
            assert cache.reused == reused
        assert with_cache == without
    finally:
        server.stop()


# -- limits and mistakes -------------------------------------------------------------------------------------------

def test_a_full_queue_answers_429_with_retry_after_and_a_late_request_times_out(server, expected):
    settings = server.engine.settings
    saved = (settings.max_queue, settings.batch_window, settings.timeout)
    client = server.client()
    try:
        settings.max_queue, settings.batch_window = 1, 1.5  # the first request waits in the queue for its batch
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(chat, client, "sft", CONVERSATIONS[0])
            while not server.engine.pending:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as e:
                chat(client, "sft", CONVERSATIONS[1])
            assert int(e.value.response.headers["retry-after"]) >= 1
            assert e.value.body["code"] == "queue_full" and "queue is full" in e.value.body["message"]
            assert first.result().choices[0].message.content == expected["sft"]["replies"][0]
        settings.max_queue, settings.timeout = 64, 0.5  # waits out its batch window past its timeout
        with pytest.raises(openai.APIStatusError) as e:
            chat(client, "sft", CONVERSATIONS[0])
        assert e.value.status_code == 504 and "timeout" in e.value.body["message"]
    finally:
        settings.max_queue, settings.batch_window, settings.timeout = saved
    assert chat(client, "sft", CONVERSATIONS[0]).choices[0].message.content == expected["sft"]["replies"][0]


BAD = [  # (request body or raw text, status, param, words the message has)
    ("{not json", 400, None, ["not valid JSON"]),
    ({"model": "nope", "messages": CONVERSATIONS[0]}, 404, "model", ["'nope'", "sft, sft2, prefix, emb, clf, tiny-chat-llama"]),
    ({"model": "sft", "messages": []}, 400, "messages", ["empty"]),
    ({"model": "sft", "messages": [{"role": "assistant", "content": "Hi."}]}, 400, "messages[0].role",
     ["'assistant'", "'user'"]),
    ({"model": "sft", "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, 400,
     "messages[1].role", ["'user'", "'assistant' belongs"]),
    ({"model": "sft", "messages": [{"role": "user", "content": "hot " * 400}]}, 400, "messages",
     ["maximum context length is 256 tokens", "Shorten"]),
    ({"model": "sft", "messages": CONVERSATIONS[0], "max_tokens": 0}, 400, "max_tokens", ["at least 1"]),
    ({"model": "sft", "messages": CONVERSATIONS[0], "max_tokens": 10_000}, 400, "max_tokens",
     ["maximum context length is 256", "at most"]),
    ({"model": "sft", "messages": CONVERSATIONS[0], "max_tokens": "5"}, 400, "max_tokens", ["integer"]),
    ({"model": "sft", "messages": CONVERSATIONS[0], "temperature": "hot"}, 400, "temperature", ["number"]),
    ({"model": "sft", "messages": CONVERSATIONS[0], "temperature": 3}, 400, "temperature", ["0 (greedy) to 2"]),
    ({"model": "sft", "messages": "hello"}, 400, "messages", ["list"]),
    ({"model": "sft", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", ["robot"]),
    ({"messages": CONVERSATIONS[0]}, 400, "model", ["required"]),
    ({"model": "sft", "messages": CONVERSATIONS[0], "logprobs": True}, 400, "logprobs", ["not supported"]),
    ({"model": "sft", "messages": CONVERSATIONS[0], "response_format": {"type": "json_object"}}, 400,
     "response_format", ["not supported"]),
    ({"model": "clf", "messages": CONVERSATIONS[0]}, 400, "model", ["/v1/predict"]),
]


@pytest.mark.parametrize("body,status,param,words", BAD)
def test_a_bad_request_is_an_openai_error_naming_the_field_and_the_server_serves_on(server, expected, caplog, body,
                                                                                    status, param, words):
    with caplog.at_level(logging.INFO):
        if isinstance(body, str):
            r = httpx.post(f"{server.url}/v1/chat/completions", content=body,
                           headers={"content-type": "application/json"})
        else:
            r = httpx.post(f"{server.url}/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param
    for w in words:
        assert w in err["message"], err["message"]
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR or rec.exc_info]
    assert chat(server.client(), "sft", CONVERSATIONS[0]).choices[0].message.content == expected["sft"]["replies"][0]


def test_other_endpoints_name_their_fields_too(server):
    r = httpx.post(f"{server.url}/v1/embeddings", json={"model": "emb", "input": [1, 2]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("input")
    r = httpx.post(f"{server.url}/v1/predict", json={"model": "clf", "input": ["a", "b"], "pairs": ["x"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "pairs"
    r = httpx.post(f"{server.url}/v1/embeddings", json={"model": "sft", "input": "a"})
    assert r.status_code == 400 and "/v1/chat/completions" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "sft", "prompt": "a", "n": 99})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_a_client_that_leaves_mid_stream_frees_its_rows(server, monkeypatch):
    # The server learns that a client left when a write to it fails, and a tiny model can decode 8 x 200 tokens
    # before a loaded event loop gets there (rows that end are not cancelled ones): past 10 tokens each row takes
    # 10 ms a token, the pace of a real model, so that there is time for the writes to fail.
    push = serve_engine.Row.push

    def paced_push(row, token, eos):
        if row.count >= 10:
            time.sleep(0.01)
        return push(row, token, eos)

    monkeypatch.setattr(serve_engine.Row, "push", paced_push)
    before = len(server.engine.cancelled)
    with httpx.stream("POST", f"{server.url}/v1/completions",
                      json={"model": "sft", "prompt": "hot cold", "temperature": 0, "stream": True, "n": 8,
                            "max_tokens": 200}) as r:  # greedy, these rows run to 200 tokens without an EOS
        next(r.iter_lines())
    deadline = time.monotonic() + 30
    while len(server.engine.cancelled) == before:
        assert time.monotonic() < deadline, "the rows of a client that left were never stopped"
        time.sleep(0.05)
    assert min(list(server.engine.cancelled)[before:]) < 200  # stopped before its max_tokens
    assert server.client().completions.create(model="sft", prompt="hot", temperature=0, max_tokens=2).choices


# -- the command: extra, host, key, SIGTERM ------------------------------------------------------------------------

def test_serve_without_the_extra_names_it(cli_run, runs, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    r = cli_run("serve", runs["sft"])
    assert r.code == 2 and "pip install 'tunelab[serve]'" in r.err and "Traceback" not in r.err


def test_another_host_needs_an_api_key(cli_run, runs, monkeypatch):
    monkeypatch.delenv("TUNELAB_API_KEY", raising=False)
    r = cli_run("serve", runs["sft"], "--host", "0.0.0.0")
    assert r.code == 2 and "--api-key" in r.err and "Traceback" not in r.err
    r = cli_run("serve", runs["sft"], runs["sft"])
    assert r.code == 2 and "'sft'" in r.err and "folder name" in r.err


def test_the_command_passes_its_settings_on(cli_run, runs, monkeypatch):
    seen = {}
    monkeypatch.setattr(serve_app, "serve", lambda paths, host, port, key, settings, *switches: seen.update(
        settings=settings, switches=switches))
    assert cli_run("serve", runs["sft"], "--max-batch", "3", "--batch-window-ms", "25", "--no-prefix-cache").code == 0
    assert seen["settings"] == serve_engine.Settings(max_batch=3, batch_window=0.025, prefix_cache=False)
    assert seen["switches"] == (False, False)
    assert cli_run("serve", runs["sft"], "--allow-pickle").code == 0
    assert seen["settings"].prefix_cache is True and seen["switches"] == (False, True)


def test_sigterm_lets_the_request_in_flight_finish_then_exits_0(runs, expected):
    port, key = free_port(), "s3cret"
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TUNELAB_API_KEY": key, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tunelab", "serve", str(runs["sft"]), "--port", str(port),
                             "--batch-window-ms", "1500"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        auth = {"Authorization": f"Bearer {key}"}
        wait_ready(url, auth, proc)
        r = httpx.get(f"{url}/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(chat, client, "sft", CONVERSATIONS[0])
            time.sleep(0.5)  # it now waits in its 1.5 s batch window
            proc.send_signal(signal.SIGTERM)
            assert in_flight.result(timeout=60).choices[0].message.content == expected["sft"]["replies"][0]
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/health", headers=auth)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_run_that_cannot_load_stops_the_server_with_its_error(runs, tmp_path):
    import shutil

    broken = shutil.copytree(runs["sft"], tmp_path / "moved-base")
    config = broken / "config.yaml"  # its base model (model.path, the only path: key) moved away
    config.write_text("".join(line.split("path:")[0] + f"path: {tmp_path / 'gone'}\n" if "path:" in line else line
                              for line in config.read_text().splitlines(keepends=True)))
    proc = subprocess.run([sys.executable, "-m", "tunelab", "serve", str(broken), "--port", str(free_port())],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    assert "error: The run" in proc.stderr and "base model could not be loaded" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_run_folder_cannot_turn_on_its_models_code(runs, tiny_bert, tmp_path):
    """The trust rules of `tunelab predict`: the run's own model.trust_remote_code is ignored, the caller's flag
    (--trust-remote-code to `tunelab serve`) counts."""
    import shutil

    from test_untrusted_runs import plant_code, turn_on

    run, base, marker = tmp_path / "handed-over", tmp_path / "base", tmp_path / "MARKER"
    shutil.copytree(runs["clf"], run)
    shutil.copytree(tiny_bert, base)
    turn_on(run, trust_remote_code=True, path=str(base))
    plant_code(base, marker)
    with pytest.raises(tunelab.TunelabError, match="--trust-remote-code"):
        serve_engine.load([run])
    assert not marker.exists()
    assert serve_engine.load([run], trust_remote_code=True)["handed-over"].kind == serve_engine.PREDICT
    assert marker.exists()
