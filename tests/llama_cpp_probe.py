"""Run a GGUF file in llama.cpp (llama-cpp-python) in a process of its own and print what it did, as JSON.

The tests call this with `python llama_cpp_probe.py REQUEST.json`: llama.cpp is native code, and a crash there (a
CPU path that misbehaves on one machine) must fail one test with its signal, not take the whole pytest run down.

Request: {"model": path, "prompts": [text, ...], "max_new_tokens": n, "scores_for": [[ids], ...] or null,
"f32_cache": bool}. Reply: {"template": the file's chat template, "add_bos": bool, "eos": id, "tokens": [[ids] per
prompt, as llama.cpp tokenizes the text with special tokens parsed], "greedy": [[ids] per prompt, to EOS or the
limit], "scores": [[[logit, ...] per position] per scores_for entry]}.
Exit 3 with a message when llama_cpp cannot be imported.
"""

from __future__ import annotations

import json
import sys


def main(request_path: str) -> None:
    request = json.loads(open(request_path, encoding="utf-8").read())
    try:
        import llama_cpp
    except ImportError as e:
        print(f"llama_cpp cannot be imported: {e}", file=sys.stderr)
        sys.exit(3)
    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if request.get("f32_cache") else {}
    llm = llama_cpp.Llama(model_path=request["model"], n_ctx=request.get("n_ctx", 512), logits_all=True,
                          verbose=False, n_threads=request.get("threads", 1), seed=0, flash_attn=False, **cache)
    add_bos = bool(llm.metadata.get("tokenizer.ggml.add_bos_token") == "true")
    eos = llm.token_eos()
    out = {"template": llm.metadata.get("tokenizer.chat_template"), "add_bos": add_bos, "eos": eos,
           "tokens": [], "greedy": [], "scores": []}
    for text in request["prompts"]:
        ids = llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)
        out["tokens"].append(ids)
        reply = []
        for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
            if token == eos or len(reply) == request["max_new_tokens"]:
                break
            reply.append(int(token))
        out["greedy"].append(reply)
    for ids in request.get("scores_for") or []:
        llm.reset()
        llm.eval(ids)
        out["scores"].append([[float(x) for x in row] for row in llm.scores[: len(ids)]])
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1])
