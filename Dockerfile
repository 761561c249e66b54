# syntax=docker/dockerfile:1
# AgentPRM Serve: `agentprm serve` in a container, configured by AGENTPRM_* environment variables.
#
# GPU image (default base; torch 2.13.0 from PyPI is the CUDA 13 build and brings its own CUDA libraries,
# so the small CUDA "base" flavour is enough; the host needs the NVIDIA container toolkit and an NVIDIA
# driver >= 580, which CUDA 13 requires. The base image is CUDA 13 too, so on an older driver the container
# toolkit refuses to start the container with a message naming the driver, instead of torch finding no GPU):
#   docker build -t agentprm-serve:gpu .
#   docker run --gpus all -p 8000:8000 agentprm-serve:gpu
# CPU image (Debian bookworm, python3.11, PyTorch's CPU wheel; no Triton, so no compiler):
#   docker build -t agentprm-serve:cpu --build-arg BASE_IMAGE=debian:bookworm-slim \
#     --build-arg TORCH_VERSION=2.13.0+cpu --build-arg TRITON_BUILD_DEPS= \
#     --build-arg PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu .
# docker/build-local.sh builds and runs the CPU image with buildah (no Docker engine needed).
#
# The image serves AGENTPRM_MODEL (default: the shipped checkpoint agentprm-babyai-small) from the model
# store AGENTPRM_STORE=/models, a volume that starts with the checkpoints shipped in model_store/checkpoints/.
# Readiness is /ready, liveness /health, metrics /metrics, all on port 8000.

ARG BASE_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

# ---- python-base: the base image plus the distribution's python3 (3.11 on bookworm, 3.12 on Ubuntu 24.04)
FROM ${BASE_IMAGE} AS python-base
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8
# The base image is chosen at build time (Debian or Ubuntu), so apt versions cannot be pinned here; the
# base image tag pins the distribution release instead.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# ---- builder: a virtual environment with torch, the dependencies and the package ------------------------
FROM python-base AS builder
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# pip reads these from the environment: PIP_CERT (a CA bundle for an intercepting proxy), PIP_FIND_LINKS and
# PIP_EXTRA_INDEX_URL (where a CPU torch wheel lies). Unset unless given as --build-arg.
ARG PIP_CERT
ARG PIP_FIND_LINKS
ARG PIP_EXTRA_INDEX_URL
# torch first, on its own layer: the largest download, and it changes only with the pin.
ARG TORCH_VERSION=2.13.0
RUN pip install "torch==${TORCH_VERSION}"
# The package's dependencies, read from pyproject.toml, so editing the source does not reinstall them.
RUN --mount=type=bind,source=pyproject.toml,target=/tmp/pyproject.toml \
    python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/tmp/pyproject.toml', 'rb'))['project']['dependencies']))" \
      > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt
# .dockerignore lets only pyproject.toml, README.md and the package folders through.
COPY . /src
# The shipped checkpoints become the image's model store /models; the package's own checkpoints folder
# points there, so there is one copy and `--store` defaults still find it.
RUN pip install --no-deps /src \
 && mkdir -p /models \
 && if [ -d /src/model_store/checkpoints ]; then cp -a /src/model_store/checkpoints/. /models/; fi \
 && site=$(python3 -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") \
 && rm -rf "$site/model_store/checkpoints" \
 && ln -s /models "$site/model_store/checkpoints" \
 && agentprm --help > /dev/null

# ---- runtime: python3, the virtual environment, the model store, a non-root user -------------------------
# Metadata comes first: every instruction is a layer commit, and one after the large COPY costs a full copy
# of the image with storage drivers that do not share layers (buildah's vfs).
FROM python-base AS runtime
# Triton builds a small C launcher for its kernels on first use: without a C compiler and the Python headers
# every readout on the Triton kernel fails (the engine then falls back to torch, model_store/kernels.py).
ARG TRITON_BUILD_DEPS="gcc libc6-dev python3-dev"
# hadolint ignore=DL3008,SC2086
RUN if [ -n "$TRITON_BUILD_DEPS" ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends $TRITON_BUILD_DEPS \
      && rm -rf /var/lib/apt/lists/*; \
    fi
LABEL org.opencontainers.image.title="agentprm-serve" \
      org.opencontainers.image.description="AgentPRM Serve: process reward model service for LLM agents" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    AGENTPRM_MODEL=agentprm-babyai-small \
    AGENTPRM_STORE=/models \
    AGENTPRM_HOST=0.0.0.0 \
    AGENTPRM_PORT=8000 \
    AGENTPRM_DEVICE=auto \
    AGENTPRM_DRAIN_TIMEOUT_S=30
EXPOSE 8000
# python's urllib, so the image needs no curl: exits non-zero unless /ready answers 200.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/ready' % os.environ.get('AGENTPRM_PORT', '8000'), timeout=4)"]
# Flags after the image name are appended: `docker run IMAGE --max-wait-ms 10`.
ENTRYPOINT ["agentprm", "serve"]
CMD []
RUN groupadd --system --gid 10001 agentprm \
 && useradd --system --uid 10001 --gid agentprm --create-home --home-dir /home/agentprm agentprm
WORKDIR /home/agentprm
COPY --from=builder /opt/venv /opt/venv
COPY --from=builder --chown=10001:10001 /models /models
VOLUME ["/models"]
USER 10001:10001
