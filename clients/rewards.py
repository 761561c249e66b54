"""Reward functions for RL trainers that call Python: verl, TRL and AReaL, each a thin layer over the SDK.

Text samples go to POST /v1/reward, the route OpenRLHF calls, so a text becomes steps and steps become one
reward exactly as they do for OpenRLHF: `step_format` (markers, delimiter, chatml, llama3), `delimiter` and
`aggregate` (last, min, sum_progress); None takes the server's `--reward-*` default. Conversational samples
(TRL with chat prompts: lists of messages) go to /v1/score as `messages`, one step per assistant message,
and are aggregated here with the same three rules (`last` when None).

- verl: `verl_compute_score` / `verl_compute_score_async` have verl's `compute_score(data_source,
  solution_str, ground_truth, extra_info=None, **kwargs)` signature and return `{"score": reward, ...}`
  (verl logs the other keys). The prompt is `extra_info[prompt_key]` when present (verl passes only the
  response as solution_str); settings come as keyword arguments (verl's `custom_reward_function.reward_kwargs`).
- TRL: `PRMRewardFunc(...)` and `AsyncPRMRewardFunc(...)` are `reward_funcs` callables
  `(prompts, completions, **kwargs) -> list[float]` (TRL awaits the async one, checking its `__call__`).
- AReaL: `areal_reward_fn(prompt, completions, prompt_ids, completion_ids, **kwargs) -> float`, a module-level
  function so AReaL's process pool can pickle it (bind settings with functools.partial).

Clients are made once per process (and per event loop for async) and reused: an RL step calls many times.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from clients.sdk import AsyncPRMClient, PRMClient, RewardResponse
from service.api.text_steps import aggregate_reward

CHUNK = 64  # samples per request: well under the server's --max-trajectories (256 by default)
TIMEOUT_S = 180.0  # what OpenRLHF waits for a remote reward model; RL steps tolerate slow rewards, not lost ones


@dataclass(frozen=True)
class RewardSettings:
    base_url: str = "http://127.0.0.1:8000"
    step_format: str | None = None
    delimiter: str | None = None
    aggregate: str | None = None
    model: str = "default"
    api_key: str | None = None
    timeout: float = TIMEOUT_S

    def params(self) -> dict:
        return {"step_format": self.step_format, "delimiter": self.delimiter, "aggregate": self.aggregate}


_lock = threading.Lock()
_sync_clients: dict[tuple, PRMClient] = {}
_async_clients: dict[tuple, weakref.WeakKeyDictionary] = {}


def _client(settings: RewardSettings) -> PRMClient:
    key = (settings, os.getpid())  # a forked worker must not share its parent's sockets
    with _lock:
        if key not in _sync_clients:
            _sync_clients[key] = PRMClient(settings.base_url, api_key=settings.api_key, timeout=settings.timeout,
                                           model=settings.model)
        return _sync_clients[key]


def _async_client(settings: RewardSettings) -> AsyncPRMClient:
    loop = asyncio.get_running_loop()  # an httpx.AsyncClient belongs to the loop it first ran on
    with _lock:
        per_loop = _async_clients.setdefault((settings, os.getpid()), weakref.WeakKeyDictionary())
        if loop not in per_loop:
            per_loop[loop] = AsyncPRMClient(settings.base_url, api_key=settings.api_key, timeout=settings.timeout,
                                            model=settings.model)
        return per_loop[loop]


def aggregate_steps(promises: Sequence[float], progress: Sequence[float], aggregate: str | None) -> float:
    """The reward rules of /v1/reward (the server's own function), for conversational samples scored
    through /v1/score; `aggregate` None means the route's default, `last`."""
    return aggregate_reward(promises, progress, aggregate or "last")


def _chunks(n: int):
    return [(i, min(n, i + CHUNK)) for i in range(0, n, CHUNK)]


def _merge(responses: list[RewardResponse]) -> RewardResponse:
    logs: dict[str, list] = {}
    for r in responses:
        for key, values in r.extra_logs.items():
            logs.setdefault(key, []).extend(values)
    return RewardResponse(rewards=[x for r in responses for x in r.rewards],
                          scores=[x for r in responses for x in r.scores], extra_logs=logs)


def text_rewards(settings: RewardSettings, queries: Sequence[str], prompts: Sequence[str] | None = None
                 ) -> RewardResponse:
    """Rewards for texts (prompt + response each), through /v1/reward in chunks."""
    client = _client(settings)
    return _merge([client.reward(list(queries[a:b]), None if prompts is None else list(prompts[a:b]),
                                 **settings.params()) for a, b in _chunks(len(queries))])


async def text_rewards_async(settings: RewardSettings, queries: Sequence[str], prompts: Sequence[str] | None = None
                             ) -> RewardResponse:
    client = _async_client(settings)
    return _merge(list(await asyncio.gather(*(
        client.reward(list(queries[a:b]), None if prompts is None else list(prompts[a:b]), **settings.params())
        for a, b in _chunks(len(queries))))))


def _conversation_rewards(scored, aggregate: str | None) -> list[float]:
    return [aggregate_steps([s.promise for s in r.steps], [s.progress for s in r.steps], aggregate)
            for r in scored.results]


def message_rewards(settings: RewardSettings, conversations: Sequence[Sequence[Mapping]]) -> list[float]:
    """Rewards for chat conversations (one step per assistant message), through /v1/score in chunks."""
    client = _client(settings)
    rewards = []
    for a, b in _chunks(len(conversations)):
        scored = client.score([{"messages": list(c)} for c in conversations[a:b]])
        rewards += _conversation_rewards(scored, settings.aggregate)
    return rewards


async def message_rewards_async(settings: RewardSettings, conversations: Sequence[Sequence[Mapping]]
                                ) -> list[float]:
    client = _async_client(settings)
    results = await asyncio.gather(*(client.score([{"messages": list(c)} for c in conversations[a:b]])
                                     for a, b in _chunks(len(conversations))))
    return [x for scored in results for x in _conversation_rewards(scored, settings.aggregate)]


# verl ----------------------------------------------------------------------------------------------------------


def _verl_prompt(extra_info, prompt_key: str) -> str:
    value = extra_info.get(prompt_key) if isinstance(extra_info, Mapping) else None
    return value if isinstance(value, str) else ""


def _verl_result(response: RewardResponse) -> dict:
    return {"score": response.rewards[0], "prm_num_steps": response.extra_logs["prm_num_steps"][0],
            "prm_initial_value": response.extra_logs["prm_initial_value"][0]}


def verl_compute_score(data_source, solution_str, ground_truth, extra_info=None, *, base_url: str =
                       RewardSettings.base_url, step_format: str | None = None, delimiter: str | None = None,
                       aggregate: str | None = None, model: str = "default", api_key: str | None = None,
                       prompt_key: str = "prompt", timeout: float = TIMEOUT_S, **_verl_kwargs) -> dict:
    """verl `compute_score`: the PRM reward of prompt (extra_info[prompt_key], if any) + solution_str."""
    settings = RewardSettings(base_url, step_format, delimiter, aggregate, model, api_key, timeout)
    prompt = _verl_prompt(extra_info, prompt_key)
    return _verl_result(text_rewards(settings, [prompt + solution_str], [prompt]))


async def verl_compute_score_async(data_source, solution_str, ground_truth, extra_info=None, *, base_url: str =
                                   RewardSettings.base_url, step_format: str | None = None,
                                   delimiter: str | None = None, aggregate: str | None = None,
                                   model: str = "default", api_key: str | None = None, prompt_key: str = "prompt",
                                   timeout: float = TIMEOUT_S, **_verl_kwargs) -> dict:
    """verl's async `compute_score` (its reward loop awaits coroutine functions instead of using a thread)."""
    settings = RewardSettings(base_url, step_format, delimiter, aggregate, model, api_key, timeout)
    prompt = _verl_prompt(extra_info, prompt_key)
    return _verl_result(await text_rewards_async(settings, [prompt + solution_str], [prompt]))


# TRL -----------------------------------------------------------------------------------------------------------


def _is_conversational(prompts) -> bool:
    return bool(prompts) and isinstance(prompts[0], list)


class PRMRewardFunc:
    """A TRL `reward_funcs` entry: `(prompts, completions, **kwargs) -> list[float]`, one PRM reward each.

    Text prompts: prompt + completion goes to /v1/reward. Chat prompts (lists of messages): prompt messages +
    completion messages go to /v1/score as messages.
    """

    __name__ = "agentprm"  # TRL names the reward's logged column after its callable

    def __init__(self, base_url: str = RewardSettings.base_url, **settings):
        self.settings = RewardSettings(base_url, **settings)

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if _is_conversational(prompts):
            return message_rewards(self.settings, [list(p) + list(c) for p, c in zip(prompts, completions)])
        return text_rewards(self.settings, [p + c for p, c in zip(prompts, completions)], list(prompts)).rewards

    def __repr__(self) -> str:
        return f"{type(self).__name__}({asdict(self.settings)})"


class AsyncPRMRewardFunc(PRMRewardFunc):
    """The async TRL reward function: TRL gathers async reward functions concurrently."""

    async def __call__(self, prompts, completions, **kwargs) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if _is_conversational(prompts):
            return await message_rewards_async(self.settings, [list(p) + list(c)
                                                               for p, c in zip(prompts, completions)])
        response = await text_rewards_async(self.settings, [p + c for p, c in zip(prompts, completions)],
                                            list(prompts))
        return response.rewards


# AReaL ---------------------------------------------------------------------------------------------------------


def areal_reward_fn(prompt: str, completions: str, prompt_ids=None, completion_ids=None, *,
                    base_url: str = RewardSettings.base_url, step_format: str | None = None,
                    delimiter: str | None = None, aggregate: str | None = None, model: str = "default",
                    api_key: str | None = None, timeout: float = TIMEOUT_S, **dataset_fields) -> float:
    """AReaL `reward_fn`: the PRM reward of prompt + completions (the dataset's other fields are ignored)."""
    settings = RewardSettings(base_url, step_format, delimiter, aggregate, model, api_key, timeout)
    return text_rewards(settings, [prompt + completions], [prompt]).rewards[0]
