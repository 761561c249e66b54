"""The engine's settings and their defaults, written once: service.settings.ServerSettings (flags and
environment) takes its defaults from `EngineConfig`, and `EngineConfig` its scheduler defaults from
`SchedulerConfig` (service.engine.scheduler). No torch here, so settings and the CLI can read it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

from service.engine.scheduler import SchedulerConfig
from service.engine.vllm_server import VllmConfig

# service.engine.backends.make_backend; "vllm" replaces the runner instead (service/engine/backends/vllm.py)
BACKENDS = ("auto", "packed", "padded", "vllm")
DTYPES = ("auto", "float32", "bfloat16")  # model_store.precision.resolve_dtype
DEFAULT_FORWARD_TOKENS = {"cpu": 2048, "cuda": 8192}  # CPU: bench/cpu_kernels.py measures it
# prefix_cache_bytes=None (auto): this on a CPU; on a GPU a share of the memory free after the model, the graphs
# and the backend, never less than this (service.engine.device_setup.prefix_cache_bytes).
AUTO_PREFIX_CACHE_BYTES = 256 * 1024 * 1024
_SCHEDULER = SchedulerConfig()


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"
    max_batch_tokens: int = _SCHEDULER.max_batch_tokens
    max_wait_ms: float = _SCHEDULER.max_wait_s * 1000  # 0: continuous batching (what queued while the last ran)
    max_queue_jobs: int = _SCHEDULER.max_queue_jobs
    max_queue_tokens: int = _SCHEDULER.max_queue_tokens
    max_forward_tokens: int = 0  # 0: auto, DEFAULT_FORWARD_TOKENS for the device
    max_trajectories: int = 256
    max_candidates: int = 512
    prefix_cache_bytes: int | None = None  # None: auto (AUTO_PREFIX_CACHE_BYTES, more on a GPU); 0: no cache
    prefix_block_size: int = 32
    share_prefixes: bool = True  # compute a request's shared prefix once
    max_queue_delay_s: float = _SCHEDULER.max_queue_delay_s  # 429 when queued work would take longer; 0: no bound
    max_consecutive_failures: int = _SCHEDULER.max_consecutive_failures  # failed batches in a row: dead; 0: never
    backend: str = "auto"  # one of BACKENDS (auto: packed on a CPU for Qwen2, padded elsewhere; vllm: a vLLM server)
    dtype: str = "auto"  # one of DTYPES (auto: bf16 on a GPU or a CPU where bf16 measurably pays, else fp32)
    cuda_graphs: bool = True  # on a GPU: capture the small plain passes (cuda_graphs.py); ignored on a CPU
    vllm: VllmConfig = VllmConfig()  # backend="vllm" only: the managed vLLM server's settings

    def scheduler_config(self) -> SchedulerConfig:
        return SchedulerConfig(max_batch_tokens=self.max_batch_tokens, max_wait_s=self.max_wait_ms / 1000,
                               max_queue_jobs=self.max_queue_jobs, max_queue_tokens=self.max_queue_tokens,
                               max_queue_delay_s=self.max_queue_delay_s,
                               max_consecutive_failures=self.max_consecutive_failures)

    def forward_tokens(self, device_type: str) -> int:
        """Tokens per forward pass: the configured bound, else the device's default."""
        return self.max_forward_tokens or DEFAULT_FORWARD_TOKENS.get(device_type, DEFAULT_FORWARD_TOKENS["cuda"])
