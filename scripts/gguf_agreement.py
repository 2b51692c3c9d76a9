"""How closely llama.cpp running a GGUF export follows tunelab on the same prompts: greedy replies, token by token.

    python scripts/gguf_agreement.py RUN EXPORT [EXPORT ...] --prompts demo_data/sft/test.jsonl -n 24

Each conversation in the prompts file (sft's messages format) is cut before its last reply. tunelab's reply is
`tunelab generate`'s (greedy); llama.cpp renders the same conversation with the chat template stored in the GGUF file
and decodes greedily with its default settings (f16 KV cache). Printed per file: size, whether every prompt tokenized
to tunelab's ids, how many replies are identical, how many leading tokens agree on average, and llama.cpp's tokens/s.
Needs llama-cpp-python (`make llama-cpp`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from jinja2.sandbox import ImmutableSandboxedEnvironment
from llama_cpp import Llama

import tunelab


def conversations(path: Path, n: int) -> list[list[dict]]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        messages = json.loads(line)["messages"] if line.strip() else None
        if messages and messages[-1]["role"] == "assistant":
            out.append(messages[:-1])
        if len(out) == n:
            break
    return out


def leading(a: list[int], b: list[int]) -> int:
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("exports", nargs="+")
    parser.add_argument("--prompts", required=True, type=Path)
    parser.add_argument("-n", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    prompts = conversations(args.prompts, args.n)
    run = tunelab.load(args.run)
    tok = run.tokenizer
    start = time.perf_counter()
    expected = [tok(r, add_special_tokens=False)["input_ids"]
                for r in run.generate(prompts, max_new_tokens=args.max_new_tokens)]
    print(f"tunelab: {len(prompts)} prompts, {time.perf_counter() - start:.1f} s")
    for folder in args.exports:
        (path,) = Path(folder).glob("*.gguf")
        llm = Llama(model_path=str(path), n_ctx=1024, verbose=False, seed=0)
        template = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(
            llm.metadata["tokenizer.chat_template"])
        add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
        same_ids, equal, agree, tokens, seconds = 0, 0, [], 0, 0.0
        for messages, want in zip(prompts, expected):
            text = template.render(messages=messages, add_generation_prompt=True, eos_token=tok.eos_token,
                                   bos_token=tok.bos_token)
            ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
            same_ids += ids == run.tokenizer(text, add_special_tokens=False)["input_ids"]
            reply, start = [], time.perf_counter()
            for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
                if token == llm.token_eos() or len(reply) == args.max_new_tokens:
                    break
                reply.append(token)
            seconds += time.perf_counter() - start
            tokens += len(reply)
            got = tok(tok.decode(reply, skip_special_tokens=True).strip(), add_special_tokens=False)["input_ids"]
            equal += got == want
            agree.append(leading(got, want))
        print(f"{path.name}: {path.stat().st_size / 1e6:.1f} MB; prompts tokenized as tunelab: {same_ids}/{len(prompts)}; "
              f"replies identical: {equal}/{len(prompts)}; leading tokens equal: mean {sum(agree) / len(agree):.1f} "
              f"of {sum(len(w) for w in expected) / len(expected):.1f}; llama.cpp {tokens / seconds:.1f} tokens/s")


if __name__ == "__main__":
    main()
