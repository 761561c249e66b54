"""Benchmark workloads: identical, deterministic token ids with the structure each workload promises."""

from __future__ import annotations

import pytest

from bench.workloads import Sizes, build_workloads
from model_store.export import init_random


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-wl") / "tiny"
    init_random(path, name="wl-tiny", version="1", layers=1, hidden=32, heads=2, kv_heads=1, seed=1,
                max_seq_len=2048)
    return path


@pytest.fixture(scope="module")
def workloads(ckpt):
    return build_workloads(ckpt, Sizes.quick(), seed=5, concurrencies=(1, 8))


def test_deterministic(ckpt, workloads):
    again = build_workloads(ckpt, Sizes.quick(), seed=5, concurrencies=(1, 8))
    for name in ("W1", "W2", "W3"):
        for c in (1, 8):
            assert [s.ids for r in workloads[name].requests(c) for s in r.seqs] == \
                   [s.ids for r in again[name].requests(c) for s in r.seqs]


def test_cells_never_share_sequences(workloads):
    seen: set = set()
    for name in ("W1", "W2", "W3"):
        for c in (1, 8):
            ids = {s.ids for r in workloads[name].requests(c) for s in r.seqs}
            assert not ids & seen, f"{name} c={c} repeats sequences of another cell"
            seen |= ids


def test_rerank_candidates_share_task_and_first_observation_only(workloads):
    for req in workloads["W2"].requests(8):
        assert len(req.seqs) == Sizes.quick().w2_candidates
        state = req.seqs[0].readouts[0]  # the state readout closes task + first observation
        assert len({s.ids[: state + 1] for s in req.seqs}) == 1
        assert len({s.ids[state + 1:] for s in req.seqs}) == len(req.seqs)  # then every candidate differs


def test_agent_loop_calls_grow_the_history_of_the_previous_call(workloads):
    sizes = Sizes.quick()
    for agent in workloads["W3"].agents[8]:
        calls = ([agent.warmup] if agent.warmup else []) + agent.calls
        for prev, call in zip(calls, calls[1:]):
            assert len(call.seqs) == sizes.w3_beams * sizes.w3_candidates
            if call.step == 0:
                continue  # a new episode
            previous = {s.ids for s in prev.seqs}
            for beam in call.body["beams"]:
                n = len(beam["trajectory"]["steps"])
                assert n == call.step
            # every kept beam's history is one of the candidate sequences the previous call scored
            for b in range(sizes.w3_beams):
                cand = call.seqs[b * sizes.w3_candidates]
                history_end = cand.readouts[-2] + 1  # through the last <|end|> of the history
                assert any(p == cand.ids[:history_end] for p in previous)


def test_naive_body_has_one_prefix_per_step(workloads):
    for req in workloads["W1"].requests(1) + workloads["W2"].requests(1):
        assert [len(m) for m in req.naive_map] == [len(s.readouts) - 1 for s in req.seqs]
        trajs = req.naive_body["trajectories"]
        for m in req.naive_map:
            assert [len(trajs[k]["steps"]) for k in m] == list(range(1, len(m) + 1))


def test_incremental_scoring_calls_append_one_step_to_the_previous_call(workloads):
    sizes = Sizes.quick()
    for agent in workloads["W4"].agents[8]:
        calls = ([agent.warmup] if agent.warmup else []) + agent.calls
        assert all(len(call.seqs) == 1 and call.kind == "incremental" for call in calls)
        for prev, call in zip(calls, calls[1:]):
            if call.step == 0:
                continue  # a new episode
            (before,), (after,) = prev.seqs, call.seqs
            assert after.ids[:len(before.ids)] == before.ids  # the full history again, one step longer
            assert len(after.readouts) == len(before.readouts) + 1 == call.step + 2
            assert len(call.body["trajectories"][0]["steps"]) == call.step + 1 <= sizes.w4_steps
        # what is compared across systems: the new step's promise only
        assert calls[-1].canonical([[0.1, 0.2, 0.3]], with_state=True) == [[0.3]]
