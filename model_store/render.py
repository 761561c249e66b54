"""Segment-wise rendering of trajectories into token ids and readout positions (docs/ARCHITECTURE.md,
"Rendering"). Shared byte for byte by training and serving, so it sits below both.

Segments, in order: [task_prefix] task, [observation_prefix] o_0, [state_end], then for every step
[action_prefix] a_t, [action_end], and [observation_prefix] o_{t+1} before the next action. A marker is
its single special-token id; the text after it is byte-level BPE of the text alone, with special-token
strings inside user text encoded as plain bytes (a user cannot forge a readout). Segments are encoded
independently and concatenated, so the ids of a prefix never change when steps are appended.

Readouts: `state_readout` is the position of the state_end token (initial value V_0); `step_readouts[t]`
is the position of the action_end token closing action t (promise Q_t).

`NativeRenderer` renders a native template (an imported PRM's own format, manifest.Template): literal strings
(special-token strings in them are special tokens) around user text (special-token strings stay plain
bytes), each piece encoded on its own as above. Readout of step t: the last token of its step tag; V_0: the
last token before the first step. `make_renderer(tokenizer, template)` picks the renderer.

Why the two properties still hold for a step tag that is ordinary text (Math-Shepherd's ' ки', a newline):
- prefix stability: every piece (literal, observation text, action text) is encoded on its own and the ids
  concatenated, exactly as for markers; a step's ids never depend on what follows.
- no forged readout: readout positions are where the renderer put a tag, never found by scanning the ids.
  User text that contains the tag string yields the tag's token, which the model reads as its authors' code
  would (they split on the same string), but no promise is read there and no step is added. Chat turns and
  special tags (`<extra_0>`, `<|eot_id|>`) cannot be typed at all: in user text they are plain bytes.
Parity with the source's whole-text tokenization holds when piece boundaries are pre-tokenizer split points
(special tokens always are; for byte-level BPE with the Llama-3 / Qwen2 split rule, so are a space before
a word and a run of newlines); `agentprm model import` checks a probe text both ways and reports the result.
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
    # How the next appended action's text is shaped (native templates; see NativeRenderer.append_action).
    action_format: str = "{text}"

    @property
    def readouts(self) -> tuple[int, ...]:
        return (self.state_readout, *self.step_readouts)


class Renderer:
    def __init__(self, tokenizer, template: Template, cache_size: int = 65536):
        self.tokenizer = tokenizer
        self.template = template
        if template.kind != "marker":
            raise ValueError("Renderer renders marker templates; make_renderer picks NativeRenderer for native ones")
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

    @property
    def readout_token_ids(self) -> tuple[int, ...] | None:
        """The token ids every readout sits on (None: any token can carry one)."""
        return (self.end_id, self.state_id)

    def append_action(self, rendered: "Rendered", action: str) -> tuple[int, ...]:
        """The ids of `rendered` (a state from render_steps) extended by a candidate action; readout: last id."""
        return rendered.ids + self.action_segment(action)

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


class NativeRenderer:
    """Renders a native template (see the module docstring and manifest.Template)."""

    def __init__(self, tokenizer, template: Template, cache_size: int = 65536):
        from tokenizers import Tokenizer

        if template.kind != "native":
            raise ValueError("NativeRenderer renders native templates")
        self.tokenizer = tokenizer
        self.template = template
        if template.strip_added_space:
            tokenizer = without_added_space(tokenizer)
            self.tokenizer = tokenizer
        tokenizer.encode_special_tokens = True  # user text: special-token strings stay plain text
        self._literal_tokenizer = Tokenizer.from_str(tokenizer.to_str())
        self._literal_tokenizer.encode_special_tokens = False  # literals: `<|eot_id|>` is the special token
        self._encode_text = lru_cache(maxsize=cache_size)(self._encode_uncached)
        self._literals = {}
        tag = self.literal(template.step_tag)
        if not tag:
            raise ValueError(f"step tag {template.step_tag!r} encodes to no token")
        self.end_id = tag[-1]
        # V_0 sits on a fixed token only when a literal ends the initial state.
        self.state_id = self.literal(template.task_suffix)[-1] if template.task_suffix else None

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer.encode(text, add_special_tokens=False).ids) if text else ()

    def literal(self, text: str) -> tuple[int, ...]:
        if text not in self._literals:
            ids = self._literal_tokenizer.encode(text, add_special_tokens=False).ids if text else []
            self._literals[text] = tuple(ids)
        return self._literals[text]

    @property
    def readout_token_ids(self) -> tuple[int, ...] | None:
        return None if self.state_id is None else (self.end_id, self.state_id)

    def _join(self, first: str, observation: str) -> str:
        return first if not observation else f"{first}{self.template.observation_separator}{observation}"

    def _step_pieces(self, t: int, observation: str) -> tuple[tuple[int, ...], str]:
        """Ids before step t's action (step prefix, observation) and the format its action text takes."""
        tpl = self.template
        before, after = (tpl.first_step_format if t == 0 else tpl.step_format).split("{text}")
        ids = self.literal(tpl.step_prefix) if t > 0 else ()
        if t > 0 and observation:
            return ids + self._encode_text(f"{before}{observation}{tpl.observation_separator}"), "{text}" + after
        return ids, f"{before}{{text}}{after}"

    def action_segment(self, action: str, action_format: str = "{text}") -> tuple[int, ...]:
        """Action text (shaped by `action_format`), then the step tag (readout: its last id), then the suffix."""
        tpl = self.template
        return (*self._encode_text(action_format.replace("{text}", action)), *self.literal(tpl.step_tag),
                *self.literal(tpl.step_suffix))

    def append_action(self, rendered: Rendered, action: str) -> tuple[int, ...]:
        """`rendered` extended by a candidate action up to its step tag (readout: the last id; the step suffix
        after it cannot change a causal model's readout, so it is left off)."""
        tpl = self.template
        return (*rendered.ids, *self._encode_text(rendered.action_format.replace("{text}", action)),
                *self.literal(tpl.step_tag))

    def render(self, trajectory: Trajectory) -> Rendered:
        return self.render_steps(trajectory.task, trajectory.steps)

    def render_steps(self, task: str, steps: tuple[Step, ...] | list[Step], next_observation: str | None = None
                     ) -> Rendered:
        tpl = self.template
        observations = [s.observation for s in steps]
        if next_observation is not None:
            observations.append(next_observation)
        if not observations:
            raise ValueError("a trajectory needs at least one observation")
        ids: list[int] = list(self.literal(tpl.preamble))
        ids += self._encode_text(tpl.task_format.replace("{text}", self._join(task, observations[0])))
        ids += self.literal(tpl.task_suffix)
        if not ids:
            raise ValueError("the native template renders nothing before the first step")
        state_readout = len(ids) - 1
        suffix_len = len(self.literal(tpl.step_suffix))
        step_readouts = []
        for t, step in enumerate(steps):
            before, action_format = self._step_pieces(t, observations[t])
            ids += before
            ids += self.action_segment(step.action, action_format)
            step_readouts.append(len(ids) - 1 - suffix_len)
        action_format = self._step_pieces(len(steps), "")[1]
        if next_observation is not None and steps:
            before, action_format = self._step_pieces(len(steps), next_observation)
            ids += before
        return Rendered(tuple(ids), state_readout, tuple(step_readouts), action_format)


def adds_leading_space(tokenizer) -> bool:
    """Whether the tokenizer puts a space ('▁') before every text it encodes (sentencepiece style)."""
    tokens = tokenizer.encode("a", add_special_tokens=False).tokens
    return bool(tokens) and tokens[0].startswith("\u2581")


def without_added_space(tokenizer):
    """A copy of the tokenizer that does not put '▁' before each text (Prepend normalizers dropped, Metaspace
    prepend_scheme 'never'); spaces inside the text still become '▁'."""
    import json

    from tokenizers import Tokenizer

    def strip(node):
        if not isinstance(node, dict):
            return node
        if node.get("type") == "Prepend":
            return None
        if node.get("type") == "Metaspace":
            node["prepend_scheme"] = "never"
        for key in ("normalizers", "pretokenizers"):
            if isinstance(node.get(key), list):
                node[key] = [n for n in (strip(n) for n in node[key]) if n is not None]
        return node

    data = json.loads(tokenizer.to_str())
    data["normalizer"] = strip(data.get("normalizer"))
    data["pre_tokenizer"] = strip(data.get("pre_tokenizer"))
    return Tokenizer.from_str(json.dumps(data))


def make_renderer(tokenizer, template: Template, cache_size: int = 65536):
    """The renderer of the template's kind (Renderer for markers, NativeRenderer for native templates)."""
    if template.kind == "native":
        return NativeRenderer(tokenizer, template, cache_size)
    return Renderer(tokenizer, template, cache_size)
