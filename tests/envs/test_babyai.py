"""BabyAITextEnv and its policies on real minigrid levels (fixed seeds; the whole file runs in seconds)."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("minigrid", reason="needs the envs extra (minigrid)")

from minigrid.core.constants import IDX_TO_COLOR, IDX_TO_OBJECT  # noqa: E402

from envs.babyai import ACTIONS, DEFAULT_LEVELS, MAX_OBJECTS, BabyAITextEnv  # noqa: E402
from envs.base import continue_rollouts, run_episode  # noqa: E402
from envs.policies import ExpertPolicy, NoisyExpertPolicy, RandomPolicy, make_policy  # noqa: E402

DOOR_STATES = {0: "open", 1: "closed", 2: "locked"}
ITEM = re.compile(r"^an? (.+?) (?:(\d+) steps? ahead)?(?: and )?(?:(\d+) steps? (left|right))?$")


def visible_cells(env: BabyAITextEnv) -> dict[tuple[int, int], str]:
    """(ahead, right) -> description of every non-empty cell in the agent's own image observation,
    checked against the world grid at the same place (so 'right' means the agent's right)."""
    u = env.minigrid
    image = u.gen_obs()["image"]  # [x, y, (object, colour, state)], agent at (size // 2, size - 1) facing -y
    size = u.agent_view_size
    cells = {}
    for x in range(size):
        for y in range(size):
            ahead, right = size - 1 - y, x - size // 2
            kind = IDX_TO_OBJECT[int(image[x, y, 0])]
            if (ahead, right) == (0, 0) or kind in ("unseen", "empty"):
                continue
            world = tuple(u.agent_pos + ahead * u.dir_vec + right * u.right_vec)
            obj = u.grid.get(*world)
            colour = IDX_TO_COLOR[int(image[x, y, 1])]
            assert obj is not None and (obj.type, obj.color) == (kind, colour), (world, obj, kind, colour)
            if kind == "door":
                cells[ahead, right] = f"{DOOR_STATES[int(image[x, y, 2])]} {colour} door"
            elif kind == "wall":
                cells[ahead, right] = "wall"
            else:
                cells[ahead, right] = f"{colour} {kind}"
    return cells


def listed_objects(observation: str) -> list[tuple[str, int, int]]:
    """(description, ahead, right) of each item of the 'You see ...' sentence."""
    match = re.search(r"You see (.*?)\.", observation)
    assert match, observation
    if match.group(1) == "no objects":
        return []
    items = []
    for text in match.group(1).split(", "):
        m = ITEM.match(text)
        assert m, text
        right = int(m.group(3) or 0) * (-1 if m.group(4) == "left" else 1)
        items.append((m.group(1), int(m.group(2) or 0), right))
    return items


def check_observation(env: BabyAITextEnv, observation: str) -> set[str]:
    cells = visible_cells(env)
    facing = cells.get((1, 0))
    if facing:
        assert f"You are facing {'an' if facing[0] in 'aeiou' else 'a'} {facing}." in observation
    else:
        assert "You are facing" not in observation
    objects = {pos: d for pos, d in cells.items() if d != "wall" and pos != (1, 0)}
    listed = listed_objects(observation)
    for desc, ahead, right in listed:
        assert objects.get((ahead, right)) == desc, (desc, ahead, right, objects, observation)
    assert len(listed) == min(len(objects), MAX_OBJECTS), observation
    distances = [a + abs(r) for _, a, r in listed]
    assert distances == sorted(distances)
    unlisted = set(objects) - {(a, r) for _, a, r in listed}
    if listed:
        assert all(a + abs(r) >= distances[-1] for a, r in unlisted), observation
    walls_ahead = [a for (a, r), d in cells.items() if d == "wall" and r == 0 and a > 1]
    if walls_ahead and not facing:
        assert f"Walls: {min(walls_ahead)} step" in observation, observation
    carrying = env.minigrid.carrying
    if carrying is not None:
        assert f"You are carrying a {carrying.color} {carrying.type}." in observation
    else:
        assert "carrying" not in observation
    return {d.split()[0] for d in cells.values() if d.endswith("door")} | ({"carrying"} if carrying else set())


def test_observations_describe_what_is_in_view():
    seen = set()
    levels = [*DEFAULT_LEVELS, "BabyAI-OpenDoor-v0", "BabyAI-UnlockLocal-v0"]
    for level in levels:
        env = BabyAITextEnv(level)
        policy = NoisyExpertPolicy(0.4, seed=1)
        for seed in range(3):
            observation = env.reset(seed)
            assert env.task == env.minigrid.mission
            policy.reset(seed)
            seen |= check_observation(env, observation)
            for _ in range(30):
                outcome = env.step(policy.act(env))
                seen |= check_observation(env, outcome.observation)
                assert len(outcome.observation.split()) < 90
                if outcome.done:
                    break
    # the levels above show every door state and carried objects, so those branches were checked
    assert {"open", "closed", "locked", "carrying"} <= seen


@pytest.mark.parametrize("level", DEFAULT_LEVELS)
def test_expert_solves_the_default_levels(level):
    env, expert = BabyAITextEnv(level), ExpertPolicy()
    for seed in range(6):
        trajectory = run_episode(env, expert, seed)
        assert trajectory["reward"] == 1.0 and trajectory["meta"]["success"], (level, seed)
        assert len(trajectory["steps"]) < env.max_steps
    assert expert.fallbacks == 0


def test_invalid_actions_cost_a_step_and_change_nothing():
    env = BabyAITextEnv("BabyAI-GoToObj-v0")
    first = env.reset(5)
    outcome = env.step("jump over the wall")
    assert outcome.observation.startswith('"jump over the wall" is not a valid action. Valid actions: ')
    assert all(a in outcome.observation for a in ACTIONS)
    assert outcome.observation.endswith(first)  # the world did not change
    assert (outcome.reward, outcome.done, env.env_steps, env.history) == (0.0, False, 1, ["jump over the wall"])
    # spelling variants are the same action as the canonical one
    reference = BabyAITextEnv("BabyAI-GoToObj-v0")
    reference.reset(5)
    for variant, canonical in [("  Turn   LEFT ", "turn left"), ("Move_Forward", "move forward"),
                               ("pickup", "pick up"), ("TOGGLE.", "toggle")]:
        assert env.step(variant).observation == reference.step(canonical).observation
    # invalid actions count towards the step limit
    env.reset(5)
    for _ in range(env.max_steps):
        outcome = env.step("dance")
    assert outcome.done and not outcome.success and outcome.reward == 0.0
    with pytest.raises(RuntimeError):
        env.step("turn left")


def test_failed_episodes_end_at_the_step_limit_with_zero_reward():
    env, policy = BabyAITextEnv("BabyAI-GoToObj-v0"), RandomPolicy(seed=0)
    results = [run_episode(env, policy, seed) for seed in range(6)]
    failures = [r for r in results if not r["meta"]["success"]]
    assert failures, "a random walker should fail some of these episodes"
    assert all(len(r["steps"]) == env.max_steps == 64 and r["reward"] == 0.0 for r in failures)
    assert all(r["reward"] == 1.0 for r in results if r["meta"]["success"])


def test_replay_reproduces_observations_exactly():
    env = BabyAITextEnv("BabyAI-PickupLoc-v0")
    trajectory = run_episode(env, NoisyExpertPolicy(0.5, seed=3), seed=11)
    actions = [s["action"] for s in trajectory["steps"]]
    fresh = BabyAITextEnv("BabyAI-PickupLoc-v0")
    for t in range(len(actions)):
        assert fresh.replay(11, actions[:t]) == trajectory["steps"][t]["observation"]
    assert fresh.task == trajectory["task"]
    assert fresh.replay(11, actions) == env.last_outcome.observation and fresh.done


@pytest.mark.parametrize("level", ["BabyAI-GoToLocal-v0", "BabyAI-PickupLoc-v0", "BabyAI-OpenRedDoor-v0",
                                   "BabyAI-UnlockLocal-v0"])
def test_expert_continues_correctly_from_mid_episode(level):
    env = BabyAITextEnv(level)
    original = run_episode(env, ExpertPolicy(), seed=2)
    actions = [s["action"] for s in original["steps"]]
    cut = len(actions) // 2
    # a fresh expert (which never saw the start) continuing after the first half finishes the same way
    expert = ExpertPolicy()
    env.replay(2, actions[:cut])
    continuation = []
    while not env.done:
        continuation.append(expert.act(env))
        env.step(continuation[-1])
    assert continuation == actions[cut:] and env.last_outcome.success
    # from a state the noisy policy drove off the expert's path, the expert still succeeds every time
    noisy = run_episode(env, NoisyExpertPolicy(0.6, seed=4), seed=2)
    noisy_actions = [s["action"] for s in noisy["steps"]][: max(1, len(noisy["steps"]) - 1)]
    before = env.env_steps
    outcomes = continue_rollouts(env, 2, noisy_actions, ExpertPolicy(), k=3)
    assert outcomes == [1.0, 1.0, 1.0]
    assert env.env_steps - before >= 3 * len(noisy_actions)


def test_stochastic_rollouts_are_reproducible_and_differ_from_each_other():
    env = BabyAITextEnv("BabyAI-GoToLocal-v0")
    expert_actions = [s["action"] for s in run_episode(env, ExpertPolicy(), seed=3)["steps"]]
    prefix = expert_actions[: len(expert_actions) // 2]
    assert prefix
    for make in (lambda: NoisyExpertPolicy(0.5, seed=0), lambda: RandomPolicy(seed=0)):
        a = continue_rollouts(env, 3, prefix, make(), k=10)
        assert a == continue_rollouts(env, 3, prefix, make(), k=10)
        assert all(x in (0.0, 1.0) for x in a)
    assert len(set(a)) == 2, "random rollouts should sometimes succeed and sometimes fail"


def test_noisy_policy_is_deterministic_under_a_seed_and_proposes_distinct_actions():
    env = BabyAITextEnv("BabyAI-GoToLocal-v0")

    def episodes(seed):
        policy = NoisyExpertPolicy(0.5, seed=seed)
        return [[s["action"] for s in run_episode(env, policy, s)["steps"]] for s in range(4)]

    assert episodes(1) == episodes(1)
    assert episodes(1) != episodes(2)
    # an episode does not depend on what the policy played before it
    late = NoisyExpertPolicy(0.5, seed=1)
    run_episode(env, late, 3)
    assert [s["action"] for s in run_episode(env, late, 0)["steps"]] == episodes(1)[0]

    env.reset(9)
    expert_action = ExpertPolicy().act(env)
    policy = NoisyExpertPolicy(0.3, seed=0)
    for k in (1, 3, 6):
        proposals = policy.propose(env, k)
        assert len(proposals) == k == len(set(proposals)) and set(proposals) <= set(ACTIONS)
        assert proposals[0] == expert_action
    with pytest.raises(ValueError):
        policy.propose(env, 7)
    randoms = RandomPolicy(seed=0).propose(env, 4)
    assert len(set(randoms)) == 4 and set(randoms) <= set(ACTIONS)


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="unknown BabyAI level"):
        BabyAITextEnv("BabyAI-NoSuchLevel-v0")
    with pytest.raises(ValueError):
        make_policy("noisy", epsilon=1.5)
    with pytest.raises(ValueError):
        make_policy("greedy")
    with pytest.raises(TypeError):
        from tests.envs.test_base import Corridor

        corridor = Corridor()
        corridor.reset(0)
        ExpertPolicy().act(corridor)


def test_target_side_reads_where_the_named_object_is_from_the_text_alone():
    """`target_side(task, observation)` (what the evaluation's "target in view" turn states rest on) agrees with
    the world: the objects the mission refers to (minigrid's own obj_set), placed relative to the agent, among
    those the observation lists (or the one in front)."""
    from envs.babyai import target_side

    found = set()
    for level in ("BabyAI-GoToLocal-v0", "BabyAI-GoToRedBall-v0", "BabyAI-OpenDoorColor-v0", "BabyAI-GoToDoor-v0",
                  "BabyAI-PickupDist-v0"):
        env = BabyAITextEnv(level)
        policy = NoisyExpertPolicy(0.5, seed=2)
        for seed in range(4):
            observation = env.reset(seed)
            policy.reset(seed)
            for _ in range(12):
                u = env.minigrid
                shown = {(a, r) for _, a, r in listed_objects(observation)}
                if (1, 0) in visible_cells(env):
                    shown.add((1, 0))
                sides = set()
                for obj in u.instrs.desc.obj_set:
                    if obj.cur_pos is None or obj is u.carrying:
                        continue
                    rel = (obj.cur_pos[0] - u.agent_pos[0], obj.cur_pos[1] - u.agent_pos[1])
                    ahead = int(rel[0] * u.dir_vec[0] + rel[1] * u.dir_vec[1])
                    right = int(rel[0] * u.right_vec[0] + rel[1] * u.right_vec[1])
                    if (ahead, right) in shown:
                        sides.add("ahead" if right == 0 else "right" if right > 0 else "left")
                expected = sides.pop() if len(sides) == 1 and sides != {"ahead"} else None
                assert target_side(env.task, observation) == expected, (env.task, observation, expected)
                found.add(expected)
                outcome = env.step(policy.act(env))
                if outcome.done:
                    break
                observation = outcome.observation
    assert found == {"left", "right", None}
