"""Server settings: one BaseSettings class, read from AGENTPRM_* environment variables, overridden by CLI flags."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = "agentprm-babyai-small"


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTPRM_", extra="ignore", protected_namespaces=())

    model: str = Field(DEFAULT_MODEL, description="Checkpoint path, or name[:version] in the store")
    store: str | None = Field(None, description="Model store folder (default: the checkpoints shipped in model_store/)")
    host: str = Field("127.0.0.1", description="Address to bind")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    max_batch_tokens: int = Field(16384, ge=1, description="Token budget of one dynamic batch")
    max_wait_ms: float = Field(5.0, ge=0, description="How long a batch waits for more requests")
    max_forward_tokens: int = Field(8192, ge=1, description="Padded tokens per forward pass inside a batch")
    max_queue_jobs: int = Field(4096, ge=1, description="Queued sequences beyond which requests get 429")
    max_queue_tokens: int = Field(1 << 20, ge=1, description="Queued tokens beyond which requests get 429")
    max_trajectories: int = Field(256, ge=1, description="Trajectories per /v1/score request")
    max_candidates: int = Field(512, ge=1, description="Candidates per /v1/rerank or /v1/beam-expand request")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Request body limit (413 beyond)")
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    def engine_config(self):
        from service.engine.engine import EngineConfig

        return EngineConfig(device=self.device, max_batch_tokens=self.max_batch_tokens, max_wait_ms=self.max_wait_ms,
                            max_queue_jobs=self.max_queue_jobs, max_queue_tokens=self.max_queue_tokens,
                            max_forward_tokens=self.max_forward_tokens, max_trajectories=self.max_trajectories,
                            max_candidates=self.max_candidates)
