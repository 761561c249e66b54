"""Generated text -> trajectory, for reward hooks that send one string per sample (OpenRLHF's `query`).

Pure functions, no FastAPI. `step_format` says how the text splits into steps:
- `markers`: our template's marker strings in the text (`<|task|>` task, `<|obs|>` observation, `<|act|>`
  action, `<|end|>` end of action; `<|state|>` is ignored): the format the shipped checkpoints were trained on;
- `delimiter`: the prompt is the task; the response (the text after the prompt) splits on `delimiter` into
  actions, each with an empty observation (the usual reasoning-PRM reading: one step per paragraph);
- `chatml` / `llama3`: the text is a chat transcript in that chat template (`<|im_start|>role ... <|im_end|>`,
  or `<|start_header_id|>role<|end_header_id|> ... <|eot_id|>`); its turns are read as chat messages and mapped
  by service.api.messages (so assistant turns are actions, user/tool turns observations).

`aggregate` says how the steps become one reward: `last` (the last step's promise: the paper's rule), `min`
(the lowest promise) or `sum_progress` (the sum of the steps' progress, which is the last promise minus
the initial value). A text with no step gets reward 0.0.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from service.api.messages import MessagesError, map_messages

StepFormat = Literal["markers", "delimiter", "chatml", "llama3"]
RewardAggregate = Literal["last", "min", "sum_progress"]
STEP_FORMATS = ("markers", "delimiter", "chatml", "llama3")
REWARD_AGGREGATES = ("last", "min", "sum_progress")

# The default template of model_store.manifest.Template: the checkpoints we train and ship.
TASK, OBS, ACT, END, STATE = "<|task|>", "<|obs|>", "<|act|>", "<|end|>", "<|state|>"
_MARKERS = re.compile("(" + "|".join(re.escape(m) for m in (TASK, OBS, ACT, END, STATE)) + ")")
_CHATML = re.compile(r"<\|im_start\|>(\w+)\n?(.*?)(?:<\|im_end\|>|(?=<\|im_start\|>)|\Z)", re.S)
_LLAMA3 = re.compile(r"<\|start_header_id\|>(\w+)<\|end_header_id\|>\n*(.*?)(?:<\|eot_id\|>|<\|eom_id\|>|"
                     r"(?=<\|start_header_id\|>)|\Z)", re.S)


_ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def decode_escapes(text: str) -> str:
    """`\\n`, `\\t` and `\\\\` as newline, tab and backslash: a delimiter typed in a flag, variable or URL."""
    return re.sub(r"\\([nt\\])", lambda m: _ESCAPES[m.group(1)], text)


class TextStepsError(ValueError):
    """Text that the chosen step format cannot read."""


@dataclass(frozen=True)
class TextTrajectory:
    task: str
    steps: tuple[tuple[str, str], ...]  # (observation, action)


def parse_markers(text: str) -> TextTrajectory:
    """Read `<|task|>`/`<|obs|>`/`<|act|>`/`<|end|>` segments; an unclosed last action still counts."""
    task, observation, steps = None, "", []
    current, buffer = None, []

    def flush():
        nonlocal task, observation
        value = "".join(buffer)
        if current == TASK:
            task = value
        elif current == OBS:
            observation = value
        elif current == ACT:
            steps.append((observation, value))
            observation = ""
        buffer.clear()

    for piece in _MARKERS.split(text):
        if piece in (TASK, OBS, ACT, END, STATE):
            flush()
            current = piece if piece in (TASK, OBS, ACT) else None
        elif current is not None:
            buffer.append(piece)
    flush()
    if task is None:
        raise TextStepsError(f"no {TASK} marker: with step_format=markers the text must be rendered in the "
                             f"template ({TASK} task {OBS} observation {ACT} action {END} ...)")
    return TextTrajectory(task, tuple(steps))


def parse_delimited(text: str, prompt: str | None, delimiter: str) -> TextTrajectory:
    """Task = the prompt; the rest of the text, split on `delimiter`, gives one action per non-blank piece."""
    if not delimiter:
        raise TextStepsError("step_format=delimiter needs a non-empty delimiter")
    prompt = prompt or ""
    if not text.startswith(prompt):
        raise TextStepsError("the prompt is not the start of the query (OpenRLHF sends query = prompt + response)")
    response = text[len(prompt):]
    actions = [piece.strip() for piece in response.split(delimiter)]
    return TextTrajectory(prompt, tuple(("", a) for a in actions if a))


def parse_chat(text: str, template: Literal["chatml", "llama3"]) -> TextTrajectory:
    """Read the transcript's turns as chat messages, then map them as messages input is mapped."""
    pattern = _CHATML if template == "chatml" else _LLAMA3
    messages = [{"role": "tool" if role == "ipython" else role, "content": content.strip()}
                for role, content in pattern.findall(text)]
    if not messages:
        raise TextStepsError(f"no {template} turns in the text")
    try:
        conversation = map_messages(messages, "query turns")
    except MessagesError as exc:
        raise TextStepsError(str(exc)) from None
    return TextTrajectory(conversation.task, tuple((s.observation, s.action) for s in conversation.steps))


def parse_text(text: str, prompt: str | None, step_format: StepFormat, delimiter: str) -> TextTrajectory:
    if step_format == "markers":
        return parse_markers(text)
    if step_format == "delimiter":
        return parse_delimited(text, prompt, delimiter)
    if step_format in ("chatml", "llama3"):
        return parse_chat(text, step_format)
    raise TextStepsError(f"step_format must be one of {STEP_FORMATS}")


def aggregate_reward(promises: Sequence[float], progress: Sequence[float], aggregate: RewardAggregate) -> float:
    """One scalar from a trajectory's per-step promise and progress (0.0 for a trajectory without steps)."""
    if not promises:
        return 0.0
    if aggregate == "last":
        return float(promises[-1])
    if aggregate == "min":
        return float(min(promises))
    if aggregate == "sum_progress":
        return float(sum(progress))
    raise ValueError(f"aggregate must be one of {REWARD_AGGREGATES}")
