"""The evaluation's parts on tiny inputs: intervals and paired tests, the level split and seeding, candidates
sampled from the policy, the optimal-action ground truth, Best-of-N picks through a live server, the
step-level check and the per-seed summary."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

pytest.importorskip("minigrid", reason="needs the envs extra (minigrid)")

from clients.sdk import PRMClient  # noqa: E402
from envs.evaluate import (CappedBabyAIEnv, DataConfig, HeldoutConfig, collect, env_from_meta,  # noqa: E402
                           heldout_episodes, read_jsonl)
from envs.babyai import ACTIONS  # noqa: E402
from envs.policies import ExpertPolicy, NoisyExpertPolicy  # noqa: E402
from envs.rollout import episode_seed  # noqa: E402
from envs.stats import paired_test, per_level, spread, wilson  # noqa: E402
from envs.stepcheck import action_costs, optimal_actions  # noqa: E402
from envs.summary import summarise  # noqa: E402
from envs.verifiers import (ForwardChooser, RandomChooser, bon_picks, evaluate_beam, expert_states,  # noqa: E402
                            sampled_proposals, step_discrimination, turn_states)
from tests.conftest import trajectory_json  # noqa: E402

LEVEL = "BabyAI-GoToRedBall-v0"


@pytest.mark.parametrize("k, n, low, high", [(5, 10, 0.2366, 0.7634), (0, 10, 0.0, 0.2775), (10, 10, 0.7225, 1.0),
                                             (81, 263, 0.2553, 0.3662)])
def test_wilson_interval_matches_published_values(k, n, low, high):
    got = wilson(k, n)
    assert got[0] == pytest.approx(low, abs=5e-4) and got[1] == pytest.approx(high, abs=5e-4)


def test_paired_test_is_exact_on_small_samples_and_detects_a_real_difference():
    assert paired_test([1, 0, 1], [1, 0, 1]) == 1.0  # no episode differs
    # 3 episodes differ, all in favour of a: 2 of the 8 sign patterns are as extreme (all + or all -)
    assert paired_test([1, 1, 1, 0], [0, 0, 0, 0]) == pytest.approx(2 / 8)
    a, b = [1] * 30 + [0] * 10, [0] * 25 + [1] * 5 + [0] * 10
    assert paired_test(a, b) < 0.001  # 25 wins against 0 losses (Monte-Carlo branch: 25 > 16 differing)
    assert paired_test([1, 0] * 20, [0, 1] * 20) > 0.5  # as many wins as losses
    with pytest.raises(ValueError):
        paired_test([1, 0], [1])


def test_per_level_tables_and_spread_over_seeds():
    table = per_level(["a", "a", "b", "b", "b"], [1, 0, 1, 1, 0])
    assert table["a"]["rate"] == 0.5 and table["a"]["n"] == 2 and table["b"]["rate"] == pytest.approx(2 / 3)
    s = spread([0.5, 0.7, 0.9])
    assert s["mean"] == pytest.approx(0.7) and (s["min"], s["max"]) == (0.5, 0.9) and s["std"] == pytest.approx(0.2)


def test_training_rollouts_cycle_epsilons_and_seed_the_policy_apart_from_the_episodes(tmp_path):
    out = tmp_path / "train.jsonl"
    config = DataConfig(levels=(LEVEL,), episodes=6, epsilons=(0.0, 1.0), horizon=7)
    summary = collect(config, out, progress=False)
    rows = read_jsonl(out)
    assert summary["episodes"] == len(rows) == 6
    assert [r["meta"]["epsilon"] for r in rows] == [0.0, 1.0] * 3
    assert all(len(r["steps"]) <= 7 for r in rows)
    for r in rows:  # what `agentprm train --mc-env envs.evaluate:env_from_meta` rebuilds
        env = env_from_meta(r["meta"])
        env.replay(r["meta"]["seed"], [s["action"] for s in r["steps"]])
        assert env.done and env.last_outcome.reward == r["reward"]
    other = tmp_path / "other.jsonl"
    collect(DataConfig(levels=(LEVEL,), episodes=6, epsilons=(0.0, 1.0), horizon=7, policy_seed=5), other,
            progress=False)
    moved = read_jsonl(other)
    assert [r["meta"]["seed"] for r in moved] == [r["meta"]["seed"] for r in rows]  # same episodes
    assert [r["steps"] for r in moved] != [r["steps"] for r in rows]  # other random actions


def test_branch_points_add_every_other_action_in_the_same_state_and_leave_the_base_episodes_alone(tmp_path):
    base_config = DataConfig(levels=(LEVEL,), episodes=4, epsilons=(0.3,), horizon=10)
    collect(base_config, tmp_path / "base.jsonl", progress=False)
    collect(DataConfig(levels=(LEVEL,), episodes=4, epsilons=(0.3,), horizon=10, branch_fraction=1.0),
            tmp_path / "branched.jsonl", progress=False)
    base, rows = read_jsonl(tmp_path / "base.jsonl"), read_jsonl(tmp_path / "branched.jsonl")
    assert [r for r in rows if "branch_t" not in r["meta"]] == base  # the base data is unchanged
    branched = [r for r in rows if "branch_t" in r["meta"]]
    assert len(branched) == 4 * 5  # one branch point per episode, the five actions not taken there
    for parent in base:
        kids = [r for r in branched if r["meta"]["seed"] == parent["meta"]["seed"]
                and r["meta"]["sample"] == parent["meta"]["sample"]]
        t = kids[0]["meta"]["branch_t"]
        assert {k["steps"][t]["action"] for k in kids} | {parent["steps"][t]["action"]} == set(ACTIONS)
        for kid in kids:  # same history and observation up to t; the outcome is what the environment says
            assert kid["steps"][:t] == parent["steps"][:t]
            assert kid["steps"][t]["observation"] == parent["steps"][t]["observation"]
            env = env_from_meta(kid["meta"])
            env.replay(kid["meta"]["seed"], [s["action"] for s in kid["steps"]])
            assert env.done and env.last_outcome.reward == kid["reward"] and len(kid["steps"]) <= 10
    with pytest.raises(ValueError, match="branch_fraction"):
        DataConfig(branch_fraction=1.5).check()


def test_heldout_episodes_take_exact_seeds_and_skip_training_pairs(tmp_path):
    train = tmp_path / "train.jsonl"
    first = episode_seed(1, 0)
    train.write_text(json.dumps({"task": "t", "steps": [{"observation": "o", "action": "a"}], "reward": 0.0,
                                 "meta": {"env": "babyai", "level": LEVEL, "seed": first}}) + "\n")
    held = heldout_episodes(HeldoutConfig(levels=(LEVEL, "BabyAI-GoToObj-v0"), episodes=2), train)
    assert held == [(LEVEL, episode_seed(1, 1)), (LEVEL, episode_seed(1, 2)),
                    ("BabyAI-GoToObj-v0", episode_seed(1, 0)), ("BabyAI-GoToObj-v0", episode_seed(1, 1))]
    exact = heldout_episodes(HeldoutConfig(levels=(LEVEL,), seeds=(first, 11, 12)), train)
    assert exact == [(LEVEL, 11), (LEVEL, 12)]


def test_sampled_candidates_merge_duplicates_and_follow_the_policy():
    env = CappedBabyAIEnv(LEVEL, 24)
    env.reset(3)
    expert_only = sampled_proposals(NoisyExpertPolicy(0.0, 0))
    expert_action = ExpertPolicy().act(env)
    assert expert_only(env, 8) == [expert_action]  # 8 samples of a deterministic policy: one candidate
    noisy = NoisyExpertPolicy(0.7, 0)
    draws = [sampled_proposals(noisy)(env, 8) for _ in range(200)]
    assert all(len(d) == len(set(d)) and 1 <= len(d) <= 6 for d in draws)
    share = sum(expert_action in d for d in draws) / len(draws)
    rare = sum("drop" in d for d in draws) / len(draws) if expert_action != "drop" else 0.0
    assert share > rare  # the expert's action (p = 0.42 per draw) appears more often than any one other (0.12)


def test_action_costs_find_the_optimal_actions():
    env = CappedBabyAIEnv("BabyAI-GoToRedBallNoDists-v0", 24)
    expert = ExpertPolicy()
    seed = episode_seed(5, 0)
    env.reset(seed)
    costs = action_costs(env, seed, [], expert)
    assert set(costs) == set(env.valid_actions)
    best = optimal_actions(costs)
    assert expert.act(env.replay(seed, []) and env) in best  # the expert's own move is among the best
    finite = [c for c in costs.values() if c is not None]
    assert min(finite) < max(finite)  # some action wastes steps
    assert optimal_actions({"a": None, "b": None}) == set()


def test_best_of_n_from_one_rerank_equals_a_rerank_per_n_and_the_argmax_of_scores(live_server):
    candidates = [trajectory_json("go to the red ball", 1 + i % 5, seed=i)["steps"] for i in range(12)]
    ns = (1, 2, 3, 4, 8, 12)
    with PRMClient(live_server) as prm:
        one = bon_picks(prm, "go to the red ball", candidates, ns, per_n=False)
        per_n = bon_picks(prm, "go to the red ball", candidates, ns, per_n=True)
        scores = [r.score for r in prm.score([{"task": "go to the red ball", "steps": c} for c in candidates]).results]
    assert one == per_n
    for n in ns:
        assert one[n] == max(range(n), key=lambda i: (scores[i], -i))
    assert len(set(one.values())) > 1  # the random checkpoint does prefer different candidates


def test_beam_search_with_baseline_choosers_is_reproducible():
    episodes = [(LEVEL, episode_seed(1, i)) for i in range(3)]

    def run():
        return evaluate_beam(lambda seed: RandomChooser(seed), lambda level: CappedBabyAIEnv(level, 10),
                             NoisyExpertPolicy(0.7, 0), episodes, ((2, 4),))

    first = run()
    assert first == run()
    assert len(first["2x4"]["outcomes"]) == 3 and all(o in (0, 1) for o in first["2x4"]["outcomes"])


def test_step_discrimination_scores_every_action_at_expert_states():
    env_factory = lambda level: CappedBabyAIEnv(level, 24)  # noqa: E731
    expert = ExpertPolicy()
    from envs.base import run_episode

    trajectories = [run_episode(env_factory("BabyAI-GoToRedBallNoDists-v0"), expert, episode_seed(5, i))
                    for i in range(2)]
    states = expert_states(trajectories, env_factory, expert)
    assert states and all(s["expert"] in s["optimal"] for s in states)
    forward = step_discrimination(ForwardChooser(0), states)
    assert forward["top"] == ["move forward"] * len(states)
    assert forward["top_optimal"] == [int("move forward" in s["optimal"]) for s in states]

    class Oracle:  # promises that prefer exactly the optimal actions
        def beam_expand(self, beams, beam_width):
            rows = []
            for beam in beams:
                state = next(s for s in states if s["steps"] == beam["trajectory"]["steps"]
                             and s["observation"] == beam["observation"])
                rows.append([SimpleNamespace(promise=float(a in state["optimal"])) for a in beam["candidates"]])
            return SimpleNamespace(candidates=rows)

    assert step_discrimination(Oracle(), states)["top_optimal"] == [1] * len(states)


def test_summary_averages_seeds_and_tests_against_baselines():
    levels = ["L1"] * 10 + ["L2"] * 10
    good, bad = [1] * 20, [0] * 20
    test = {"levels": levels, "state_levels": ["L1"] * 4, "optimal_sizes": [1] * 4, "forward_optimal": [0] * 4,
            "forward_expert": [0] * 4}
    records = {
        "config": {"beams": [[2, 4]]}, "test": test,
        "runs": [{"method": "agentprm", "seed": s, "records": {"beam": {"2x4": {"outcomes": good if s else bad}},
                                                               "steps": {"top_optimal": [1] * 4, "top_expert": [1] * 4}}}
                 for s in (0, 1)],
        "baselines": {"random": {"beam": {"2x4": {"outcomes": bad}}}, "sampler": {"bon": {"1": bad}}},
    }
    summary = summarise(records)
    beam = summary["methods"]["agentprm"]["beam 2x4"]
    assert beam["seeds"]["mean"] == 0.5 and (beam["seeds"]["min"], beam["seeds"]["max"]) == (0.0, 1.0)
    assert beam["paired"]["random"]["diff"] == 0.5 and beam["paired"]["random"]["p"] < 0.001
    assert beam["paired"]["sampler"]["diff"] == 0.5  # the sampler's single sample stands beside beam search
    assert beam["per_level"]["L1"]["rate"] == 0.5
    top = summary["methods"]["agentprm"]["top_optimal"]
    assert top["paired"]["forward"]["diff"] == 1.0 and top["paired"]["uniform"]["diff"] == pytest.approx(5 / 6)


def test_turn_direction_reads_only_states_with_one_optimal_turn():
    """The figure a V(s) + b(a) model cannot beat: among states where exactly one turn is optimal, is that
    turn scored above the other; ties count as misses and other states are not counted."""
    states = [{"level": "L", "seed": 1, "task": "t", "steps": [], "observation": f"o{i}", "expert": e, "optimal": opt}
              for i, (e, opt) in enumerate([("turn left", ["turn left"]), ("turn right", ["turn right"]),
                                            ("move forward", ["move forward"]),
                                            ("turn left", ["turn left", "turn right"]), ("turn right", ["turn right"])])]
    assert turn_states(states) == [0, 1, 4]

    class Scores:  # "turn right" above "turn left" except at o4, where the two tie
        def beam_expand(self, beams, beam_width):
            def promise(beam, a):
                if a == "turn right":
                    return 0.5 if beam["observation"] == "o4" else 0.7
                return 0.5 if a == "turn left" else 0.1
            return SimpleNamespace(candidates=[[SimpleNamespace(promise=promise(b, a)) for a in b["candidates"]]
                                               for b in beams])

    assert step_discrimination(Scores(), states)["turn_direction"] == [0, 1, 0]
    assert step_discrimination(ForwardChooser(0), states[2:3])["turn_direction"] == []


def test_summary_sets_turn_direction_against_a_coin_flip():
    test = {"levels": ["L1"] * 2, "state_levels": ["L1"] * 4, "turn_levels": ["L1", "L2"], "optimal_sizes": [1] * 4,
            "forward_optimal": [0] * 4, "forward_expert": [0] * 4}
    records = {"config": {"beams": []}, "test": test, "baselines": {},
               "runs": [{"method": "agentprm", "seed": s,
                         "records": {"steps": {"top_optimal": [1] * 4, "top_expert": [1] * 4,
                                               "turn_direction": [1, s]}}} for s in (0, 1)]}
    turn = summarise(records)["methods"]["agentprm"]["turn_direction"]
    assert turn["seeds"]["mean"] == 0.75 and turn["paired"]["uniform"]["diff"] == 0.25
    assert turn["per_level"]["L2"]["rate"] == 0.5 and turn["per_level"]["L1"]["rate"] == 1.0


def test_direction_probe_rewards_turning_toward_the_named_object(tmp_path):
    import json
    import random

    from envs.direction_probe import main, probe_trajectory

    rng = random.Random(3)
    lengths = set()
    for _ in range(200):
        row = probe_trajectory(rng, 3, history=rng.randint(0, 4))
        lengths.add(len(row["steps"]))
        step = row["steps"][-1]  # the decisive step; earlier ones are random and do not change the outcome
        target = row["task"].removeprefix("go to the ")
        mention = next(p for p in step["observation"].removeprefix("You see ").split(". Walls")[0].split(", ")
                       if p.startswith(f"a {target} "))
        assert "ahead" not in mention and mention.endswith(row["meta"]["side"])  # purely to one side
        assert row["reward"] == float(step["action"].endswith(row["meta"]["side"]))
        assert step["observation"].count(f"a {target} ") == 1  # no distractor is the target itself
    assert lengths == {1, 2, 3, 4, 5}
    out = tmp_path / "probe.jsonl"
    main(["--out", str(out), "--n", "50", "--seed", "1", "--history", "3"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 50 and 0 < sum(r["reward"] for r in rows) < 50
    assert max(len(r["steps"]) for r in rows) == 4 and min(len(r["steps"]) for r in rows) == 1


def test_cued_turn_states_are_the_turn_states_whose_observation_shows_the_target_on_one_side():
    """"Target in view": only turn states where the named object is listed on one side count, and the rule
    "turn toward it" is scored against the optimal turn there (it can be wrong: the expert's path may differ)."""
    from envs.verifiers import cue_rule_turns, cued_turn_states

    rows = [("go to the red ball", "You see a red ball 2 steps left.", ["turn left"]),  # cued, rule right
            ("go to the red ball", "You see no objects. Walls: 3 steps ahead.", ["turn right"]),  # not in view
            ("go to a key", "You see a blue key 1 step right, a red key 2 steps left.", ["turn left"]),  # both sides
            ("go to a key", "You see a blue key 1 step ahead and 2 steps right.", ["turn left"]),  # cued, rule wrong
            ("go to the red ball", "You see a red ball 1 step left.", ["turn left", "turn right"]),  # not a turn state
            ("open the red door", "You see a red ball 1 step right. You are facing a locked red door.", ["toggle"])]
    states = [{"level": "L", "seed": 1, "task": task, "steps": [], "observation": obs, "expert": opt[0],
               "optimal": opt} for task, obs, opt in rows]
    assert cued_turn_states(states) == [0, 3]
    assert cue_rule_turns(states) == [1, 0]

    class Scores:  # prefers "turn right" everywhere
        def beam_expand(self, beams, beam_width):
            return SimpleNamespace(candidates=[[SimpleNamespace(promise=0.7 if a == "turn right" else 0.5)
                                                for a in b["candidates"]] for b in beams])

    result = step_discrimination(Scores(), states)
    assert result["turn_direction"] == [0, 1, 0, 0] and result["turn_cued"] == [0, 0]


def test_summary_sets_the_cued_turns_against_a_coin_flip_and_the_cue_rule():
    test = {"levels": ["L1"], "state_levels": ["L1"] * 2, "turn_levels": ["L1", "L1"], "cued_levels": ["L1", "L2"],
            "cue_rule": [1, 1], "optimal_sizes": [1] * 2, "forward_optimal": [0] * 2, "forward_expert": [0] * 2}
    records = {"config": {"beams": []}, "test": test, "baselines": {},
               "runs": [{"method": "agentprm", "seed": 0,
                         "records": {"steps": {"top_optimal": [1, 1], "top_expert": [1, 1],
                                               "turn_direction": [1, 0], "turn_cued": [1, 0]}}}]}
    summary = summarise(records)
    cued = summary["methods"]["agentprm"]["turn_cued"]
    assert cued["paired"]["uniform"]["diff"] == 0.0 and cued["paired"]["cue_rule"]["diff"] == -0.5
    assert cued["per_level"]["L2"]["rate"] == 0.0
    assert summary["baseline_rates"]["cue_rule"]["turn_cued"]["rate"] == 1.0
