"""Best-of-N and beam-search drivers against a live server, on a toy corridor environment."""

from __future__ import annotations

import pytest

from clients import PRMClient
from clients.search import beam_search, best_of_n
from envs.base import StepOutcome
from tests.clients.test_sdk import RecordingTransport


class Corridor:
    """Reach cell 3 by moving forward; 'turn' wastes a step; 6 steps at most."""

    max_steps = 6
    actions = ("move forward", "turn left", "turn right")

    def reset(self, seed: int) -> str:
        self.task, self.pos, self.t, self.seed = f"walk to the end of corridor {seed}", 0, 0, seed
        return self._obs()

    def _obs(self) -> str:
        return f"The end of the corridor is {3 - self.pos} steps ahead."

    def step(self, action: str) -> StepOutcome:
        self.t += 1
        if action == "move forward":
            self.pos += 1
        success = self.pos >= 3
        done = success or self.t >= self.max_steps
        return StepOutcome(self._obs(), 1.0 if success else 0.0, done, success)

    def replay(self, seed: int, actions: list[str]) -> str:
        obs = self.reset(seed)
        for a in actions:
            obs = self.step(a).observation
        return obs


def test_beam_search_returns_a_replayable_episode(live_server):
    with PRMClient(live_server) as prm:
        result = beam_search(prm, Corridor, seed=4, propose=lambda env, k: list(Corridor.actions[:k]),
                             beam_width=2, candidates_per_beam=3)
    assert result.prm_calls >= 3 and all(len(sel) <= 2 for sel in result.trace)
    env = Corridor()
    observations = [env.reset(4)]
    for step in result.steps:
        observations.append(env.step(step["action"]).observation)
    assert [s["observation"] for s in result.steps] == observations[:-1]
    assert result.success == (env.pos >= 3)
    assert 0.0 <= result.promise <= 1.0


def test_best_of_n_picks_the_rerank_winner(live_server):
    candidates = [[{"observation": f"obs {i} {j}", "action": a} for j, a in enumerate(["turn left"] * i + ["move forward"])]
                  for i in range(4)]
    with PRMClient(live_server) as prm:
        choice = best_of_n(prm, "walk", candidates)
        ranked = prm.rerank("walk", candidates)
        scored = prm.score([{"task": "walk", "steps": c} for c in candidates])
    assert choice.index == ranked.results[0].index
    # Scores come back in the candidates' order, equal to scoring each candidate alone.
    assert choice.scores == pytest.approx([r.score for r in scored.results], abs=1e-6)
    assert choice.scores[choice.index] == max(choice.scores)
    assert best_of_n(None, "walk", candidates[:1]) == (0, [])  # one candidate needs no PRM call


def test_each_search_sends_one_episode_id_on_all_its_calls(live_server):
    wire = RecordingTransport()
    with PRMClient(live_server, transport=wire) as prm:
        first = beam_search(prm, Corridor, seed=1, propose=lambda env, k: list(Corridor.actions[:k]),
                            beam_width=2, candidates_per_beam=3)
        first_ids = [h.get("x-episode-id") for h in wire.sent]
        wire.sent.clear()
        second = beam_search(prm, Corridor, seed=1, propose=lambda env, k: list(Corridor.actions[:k]),
                             beam_width=2, candidates_per_beam=3, episode_id="my-episode")
        second_ids = [h.get("x-episode-id") for h in wire.sent]
        wire.sent.clear()
        candidates = [[{"observation": "o", "action": a}] for a in Corridor.actions]
        best_of_n(prm, "walk", candidates)
        best_of_n(prm, "walk", candidates)
        bon_ids = [h.get("x-episode-id") for h in wire.sent]
    assert len(first_ids) == first.prm_calls >= 3 and set(first_ids) == {first.episode_id} and first.episode_id
    assert second_ids == ["my-episode"] * second.prm_calls and second.episode_id == "my-episode"
    assert first.trace == second.trace  # the header changes routing, never the answer
    assert len(bon_ids) == 2 and all(bon_ids) and bon_ids[0] != bon_ids[1]  # one episode per search
