"""Segment-wise rendering of trajectories into token ids and readout positions (docs/ARCHITECTURE.md,
"Rendering"). Shared byte for byte by training and serving, so it sits below both.

Segments, in order: [task_prefix] task, [observation_prefix] o_0, [state_end], then for every step
[action_prefix] a_t, [action_end], and [observation_prefix] o_{t+1} before the next action. A marker is
its single special-token id; the text after it is byte-level BPE of the text alone, with special-token
strings inside user text encoded as plain bytes (a user cannot forge a readout). Segments are encoded
independently and concatenated, so the ids of a prefix never change when steps are appended.

Readouts: `state_readout` is the position of the state_end token (initial value V_0); `step_readouts[t]`
is the position of the action_end token closing action t (promise Q_t).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from model_store.manifest import Template


@dataclass(frozen=True)
class Step:
    observation: str
    action: str


@dataclass(frozen=True)
class Trajectory:
    task: str
    steps: tuple[Step, ...]


@dataclass(frozen=True)
class Rendered:
    ids: tuple[int, ...]
    state_readout: int
    step_readouts: tuple[int, ...]

    @property
    def readouts(self) -> tuple[int, ...]:
        return (self.state_readout, *self.step_readouts)


class Renderer:
    def __init__(self, tokenizer, template: Template, cache_size: int = 65536):
        self.tokenizer = tokenizer
        self.template = template
        tokenizer.encode_special_tokens = True  # marker strings inside user text stay plain text
        ids = {m: tokenizer.token_to_id(m) for m in template.markers()}
        missing = [m for m, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"template markers {missing} are not tokens of the tokenizer")
        self.task_id = ids[template.task_prefix]
        self.obs_id = ids[template.observation_prefix]
        self.act_id = ids[template.action_prefix]
        self.end_id = ids[template.action_end]
        self.state_id = ids[template.state_end]
        self._encode_text = lru_cache(maxsize=cache_size)(self._encode_uncached)

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def task_segment(self, task: str) -> tuple[int, ...]:
        return (self.task_id, *self._encode_text(task))

    def observation_segment(self, observation: str) -> tuple[int, ...]:
        return (self.obs_id, *self._encode_text(observation))

    def action_segment(self, action: str) -> tuple[int, ...]:
        """Action ids including the closing action_end token (the readout is the last id)."""
        return (self.act_id, *self._encode_text(action), self.end_id)

    def render(self, trajectory: Trajectory) -> Rendered:
        return self.render_steps(trajectory.task, trajectory.steps)

    def render_steps(self, task: str, steps: tuple[Step, ...] | list[Step], next_observation: str | None = None
                     ) -> Rendered:
        """Render task + steps; with `next_observation`, append it (the state a candidate action extends).

        With no steps, `next_observation` plays the role of o_0 (and is followed by the state readout).
        """
        ids: list[int] = list(self.task_segment(task))
        observations = [s.observation for s in steps]
        if next_observation is not None:
            observations.append(next_observation)
        if not observations:
            raise ValueError("a trajectory needs at least one observation")
        ids += self.observation_segment(observations[0])
        ids.append(self.state_id)
        state_readout = len(ids) - 1
        step_readouts = []
        for t, step in enumerate(steps):
            if t > 0:
                ids += self.observation_segment(observations[t])
            ids += self.action_segment(step.action)
            step_readouts.append(len(ids) - 1)
        if next_observation is not None and steps:
            ids += self.observation_segment(next_observation)
        return Rendered(tuple(ids), state_readout, tuple(step_readouts))
