"""bench/fleet.py, the fleet simulation: the hash ring moves about 1/N of the episodes when a replica joins
and only the leaving replica's when one leaves; with affinity the fleet keeps one replica's hit ratio and
round robin loses it; hot episodes raise the tail on their replica. Small sizes: seconds."""

from __future__ import annotations

from bench.fleet import MEASURED, Ring, Scenario, run, single_replica_hit_ratio

EPISODES = [f"episode-{i}" for i in range(4000)]


def test_adding_a_replica_moves_about_one_nth_and_removing_one_moves_only_its_episodes():
    ten = Ring(list(range(10)))
    before = {e: ten.lookup(e) for e in EPISODES}
    grown = Ring(list(range(11)))
    moved = [e for e in EPISODES if grown.lookup(e) != before[e]]
    assert 0.06 < len(moved) / len(EPISODES) < 0.13  # 1/11 = 9.1%
    assert all(grown.lookup(e) == 10 for e in moved)  # every moved episode went to the new replica
    shrunk = Ring([r for r in range(10) if r != 3])
    changed = {e for e in EPISODES if shrunk.lookup(e) != before[e]}
    assert changed == {e for e in EPISODES if before[e] == 3}
    shares = [sum(1 for e in EPISODES if before[e] == r) / len(EPISODES) for r in range(10)]
    assert max(shares) < 0.16 and min(shares) > 0.05  # 160 points per replica: within about +-50% of 1/10


def test_affinity_keeps_one_replicas_hit_ratio_and_round_robin_does_not():
    single = single_replica_hit_ratio(MEASURED, 10)
    affine = run(MEASURED, Scenario(20, "consistent", episodes_per_replica=10))
    spread = run(MEASURED, Scenario(20, "round_robin", episodes_per_replica=10))
    assert affine["calls"] == spread["calls"] == 20 * 10 * 10
    assert abs(affine["hit_ratio"] - single) < 0.01
    assert spread["hit_ratio"] < 0.9 * single
    assert spread["computed_per_call"] > 1.5 * affine["computed_per_call"]


def test_scaling_moves_episodes_and_costs_one_miss_each():
    base = run(MEASURED, Scenario(20, episodes_per_replica=10))
    grown = run(MEASURED, Scenario(20, scale_to=40, episodes_per_replica=10))
    assert 0.3 < grown["moved_share"] < 0.7  # half the ring goes to the new replicas
    extra = grown["computed_total"] - base["computed_total"]
    worst_miss = max(MEASURED.tokens(MEASURED.miss_computed, t) - MEASURED.tokens(MEASURED.hit_computed, t)
                     for t in range(10))
    assert 0 < extra <= grown["moved"] * worst_miss * 1.01


def test_hot_episodes_raise_the_tail_under_affinity():
    calm = run(MEASURED, Scenario(20, episodes_per_replica=10))
    hot = run(MEASURED, Scenario(20, hot_episodes=4, episodes_per_replica=10))
    assert hot["p99_s"] > 1.5 * calm["p99_s"]
    assert abs(hot["hit_ratio"] - calm["hit_ratio"]) < 0.02
