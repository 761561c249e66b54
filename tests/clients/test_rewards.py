"""verl, TRL and AReaL reward functions against a live server: each equals the /v1/reward (or messages) score."""

from __future__ import annotations

import asyncio
import functools
import inspect
import pickle

import pytest

from clients import PRMClient
from clients.rewards import (AsyncPRMRewardFunc, PRMRewardFunc, areal_reward_fn, verl_compute_score,
                             verl_compute_score_async)

PROMPT = "<|task|>go to the red ball<|obs|>You see a wall 2 steps ahead."
COMPLETIONS = ["<|act|>turn left<|end|><|obs|>a red ball<|act|>move forward<|end|>", "<|act|>toggle<|end|>"]


def reference(url: str, **params) -> list[float]:
    with PRMClient(url) as client:
        return client.reward([PROMPT + c for c in COMPLETIONS], [PROMPT] * 2, **params).rewards


def test_verl_compute_score_sync_and_async(live_server):
    expected = reference(live_server, aggregate="min")
    got = [verl_compute_score("agentprm", c, None, {"prompt": PROMPT}, base_url=live_server, aggregate="min",
                              reward_router_address=None)  # verl may pass extra keywords
           for c in COMPLETIONS]
    assert [g["score"] for g in got] == pytest.approx(expected, abs=1e-6)
    assert [g["prm_num_steps"] for g in got] == [2, 1]
    bound = functools.partial(verl_compute_score_async, base_url=live_server, aggregate="min")
    assert inspect.iscoroutinefunction(bound)  # what verl's reward loop checks before awaiting it

    async def run():
        return await asyncio.gather(*(bound("agentprm", c, None, {"prompt": PROMPT}) for c in COMPLETIONS))

    assert [g["score"] for g in asyncio.run(run())] == pytest.approx(expected, abs=1e-6)


def test_trl_reward_funcs_text_and_conversational(live_server):
    expected = reference(live_server)
    func = PRMRewardFunc(live_server)
    assert func([PROMPT] * 2, COMPLETIONS, trainer_state=None) == pytest.approx(expected, abs=1e-6)
    async_func = AsyncPRMRewardFunc(live_server)
    assert inspect.iscoroutinefunction(async_func.__call__)  # how TRL tells an async reward function
    assert asyncio.run(async_func([PROMPT] * 2, COMPLETIONS)) == pytest.approx(expected, abs=1e-6)

    prompts = [[{"role": "user", "content": "go to the red ball"}, {"role": "user", "content": "a wall"}]] * 2
    completions = [[{"role": "assistant", "content": "turn left"}, {"role": "user", "content": "a ball"},
                    {"role": "assistant", "content": "move forward"}], [{"role": "assistant", "content": "toggle"}]]
    with PRMClient(live_server) as client:
        scored = client.score([{"messages": p + c} for p, c in zip(prompts, completions)])
    progress_sums = [sum(s.progress for s in r.steps) for r in scored.results]
    summed = PRMRewardFunc(live_server, aggregate="sum_progress")
    assert summed(prompts, completions) == pytest.approx(progress_sums, abs=1e-6)
    assert asyncio.run(AsyncPRMRewardFunc(live_server)(prompts, completions)) == pytest.approx(
        [r.score for r in scored.results], abs=1e-6)


def test_areal_reward_fn_is_picklable_and_scores_like_the_route(live_server):
    expected = reference(live_server, step_format="delimiter", delimiter="<|act|>")
    fn = pickle.loads(pickle.dumps(functools.partial(areal_reward_fn, base_url=live_server,
                                                     step_format="delimiter", delimiter="<|act|>")))
    got = [fn(PROMPT, c, [1, 2], [3], answer="ignored dataset field") for c in COMPLETIONS]
    assert got == pytest.approx(expected, abs=1e-6)
