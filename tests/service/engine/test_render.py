"""Segment-wise rendering: prefix-stable ids and readouts on the action end markers."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model_store.manifest import Template
from model_store.modeling import load_prm
from model_store.render import Renderer
from service.engine.types import Step, Trajectory

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40) | st.sampled_from(
    ["<|end|>", "<|state|> go", "turn left", ""])
steps_st = st.lists(st.builds(Step, text, text), min_size=1, max_size=6)


def _renderer(tiny_checkpoint):
    loaded = load_prm(tiny_checkpoint)
    return Renderer(loaded.tokenizer, loaded.manifest.template)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(task=text, steps=steps_st, extra=steps_st)
def test_extending_a_trajectory_keeps_its_ids_as_a_prefix(tiny_checkpoint, task, steps, extra):
    renderer = _renderer(tiny_checkpoint)
    short = renderer.render(Trajectory(task, tuple(steps)))
    long = renderer.render(Trajectory(task, tuple(steps + extra)))
    assert long.ids[: len(short.ids)] == short.ids
    assert long.step_readouts[: len(steps)] == short.step_readouts
    assert long.state_readout == short.state_readout
    # Readouts point at the markers, and markers inside user text never become marker tokens.
    assert [long.ids[r] for r in long.step_readouts] == [renderer.end_id] * len(steps + extra)
    assert long.ids[long.state_readout] == renderer.state_id
    assert long.ids.count(renderer.end_id) == len(steps + extra)
    assert long.ids.count(renderer.state_id) == 1


def test_readout_positions_close_each_action(tiny_checkpoint):
    renderer = _renderer(tiny_checkpoint)
    t = Trajectory("go to the red ball", (Step("wall ahead", "turn left"), Step("ball ahead", "move forward")))
    r = renderer.render(t)
    decoded = renderer.tokenizer.decode(list(r.ids[: r.step_readouts[0] + 1]), skip_special_tokens=False)
    tpl = Template()
    assert decoded == (f"{tpl.task_prefix}go to the red ball{tpl.observation_prefix}wall ahead{tpl.state_end}"
                       f"{tpl.action_prefix}turn left{tpl.action_end}")
    assert r.step_readouts[1] == len(r.ids) - 1


def test_beam_prefix_matches_full_rendering(tiny_checkpoint):
    """The history + next observation + candidate equals rendering the extended trajectory."""
    renderer = _renderer(tiny_checkpoint)
    history = (Step("o0", "turn left"), Step("o1", "move forward"))
    base = renderer.render_steps("task", history, "o2")
    ids = base.ids + renderer.action_segment("pick up")
    full = renderer.render(Trajectory("task", history + (Step("o2", "pick up"),)))
    assert ids == full.ids
    empty = renderer.render_steps("task", (), "o0")
    assert empty.ids + renderer.action_segment("turn left") == renderer.render(
        Trajectory("task", (Step("o0", "turn left"),))).ids
