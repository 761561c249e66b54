"""The HTTP side's settings and their defaults, written once (service.settings.ServerSettings reads its
defaults from here). No FastAPI import, so the settings and the admission state can use it cheaply."""

from __future__ import annotations

from dataclasses import dataclass

ALWAYS_PUBLIC = frozenset({"/health", "/ready"})


@dataclass(frozen=True)
class ApiConfig:
    max_body_bytes: int = 8 * 1024 * 1024
    api_keys: tuple[str, ...] = ()
    metrics_auth: bool = True  # with keys set, /metrics needs one too
    request_timeout_s: float = 30.0
    max_request_timeout_s: float = 300.0
    max_inflight_requests: int = 1024
    access_log: bool = True
    # /v1/reward (OpenRLHF and the clients.rewards functions): how a text becomes steps, steps one reward.
    reward_step_format: str = "markers"
    reward_step_delimiter: str = "\\n\\n"  # escapes, decoded per request (service.api.text_steps)
    reward_aggregate: str = "last"

    @property
    def public_paths(self) -> frozenset[str]:
        return ALWAYS_PUBLIC if self.metrics_auth else ALWAYS_PUBLIC | {"/metrics"}

    @classmethod
    def from_settings(cls, settings) -> "ApiConfig":
        return cls(max_body_bytes=settings.max_body_bytes, api_keys=settings.api_keys(),
                   metrics_auth=settings.metrics_auth, request_timeout_s=settings.request_timeout_s,
                   max_request_timeout_s=settings.max_request_timeout_s,
                   max_inflight_requests=settings.max_inflight_requests, access_log=settings.access_log,
                   reward_step_format=settings.reward_step_format,
                   reward_step_delimiter=settings.reward_step_delimiter, reward_aggregate=settings.reward_aggregate)
