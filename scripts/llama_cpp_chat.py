"""Ask a GGUF export questions in llama.cpp, as a user of llama-cpp-python would: the chat template, BOS and stop
token all come from the file (`make demo-sft` runs it on the tuned SmolLM2's export).

    python scripts/llama_cpp_chat.py runs/demo-sft-gguf --prompt "Do you eat?" [--prompt ...] [--max-new-tokens 48]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from llama_cpp import Llama


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path, help="a folder written by `tunelab export --format gguf`")
    parser.add_argument("--prompt", action="append", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    (path,) = args.export.glob("*.gguf")
    llm = Llama(model_path=str(path), n_ctx=1024, verbose=False, seed=0)
    for prompt in args.prompt:
        done = llm.create_chat_completion(messages=[{"role": "user", "content": prompt}], temperature=0.0,
                                          max_tokens=args.max_new_tokens)
        print(f"> {prompt}\n{done['choices'][0]['message']['content'].strip()}")


if __name__ == "__main__":
    main()
