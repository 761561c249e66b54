"""Training data: validation errors name the line, initial-state groups, the split, the hash."""

from __future__ import annotations

import json

import pytest

from training.data import (DataError, file_sha256, initial_value_targets, load_jsonl, split_by_group,
                           write_jsonl)

GOOD = {"task": "go to the red ball", "steps": [{"observation": "You see a wall.", "action": "turn left"}],
        "reward": 1.0, "meta": {"env": "babyai", "level": "BabyAI-GoToRedBall-v0", "seed": 3}}


def write_lines(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.mark.parametrize("bad,message", [
    ("{not json", "not valid JSON"),
    ([1, 2], "expected a JSON object"),
    ({**GOOD, "task": ""}, "task"),
    ({k: v for k, v in GOOD.items() if k != "steps"}, "steps: missing"),
    ({**GOOD, "steps": []}, "at least one step"),
    ({**GOOD, "steps": [{"observation": "o"}]}, "steps.0.action: missing"),
    ({**GOOD, "steps": [{"observation": "o", "action": "a"}, {"observation": 3, "action": "a"}]},
     "steps.1.observation: must be a string"),
    ({k: v for k, v in GOOD.items() if k != "reward"}, "reward: missing"),
    ({**GOOD, "reward": 1.5}, "outside [0, 1]"),
    ({**GOOD, "reward": "1"}, "reward: must be a number"),
    ({**GOOD, "reward": True}, "reward: must be a number"),
    ({**GOOD, "meta": []}, "meta: must be an object"),
])
def test_errors_name_the_file_line_and_field(tmp_path, bad, message):
    path = write_lines(tmp_path / "data.jsonl", [GOOD, "", GOOD, bad, GOOD])
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    assert str(err.value).startswith(f"{path}:4: ")  # line 4 counts the blank line 2
    assert message in str(err.value)


def test_valid_file_loads_with_extra_fields_kept(tmp_path):
    path = write_lines(tmp_path / "data.jsonl", [GOOD, {**GOOD, "reward": 0, "note": "kept", "meta": None}])
    records = load_jsonl(path)
    assert [r.reward for r in records] == [1.0, 0.0]
    assert records[1].extra == {"note": "kept"} and records[1].meta == {}
    assert records[0].trajectory().steps[0].action == "turn left"
    assert [r.line for r in records] == [1, 2]


def test_empty_and_missing_files_are_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="empty"):
        load_jsonl(write_lines(tmp_path / "empty.jsonl", [""]))


def test_initial_value_target_is_the_mean_outcome_of_the_same_initial_state(tmp_path):
    rows = [{**GOOD, "reward": r, "meta": {**GOOD["meta"], "seed": s}} for s, r in [(1, 1.0), (1, 0.0), (1, 0.5),
                                                                                     (2, 0.0)]]
    # Without a seed, the task and the first observation identify the initial state.
    no_seed = {**GOOD, "meta": {}}
    rows += [{**no_seed, "reward": 1.0}, {**no_seed, "reward": 0.0},
             {**no_seed, "reward": 1.0, "steps": [{"observation": "Another room.", "action": "turn left"}]}]
    records = load_jsonl(write_lines(tmp_path / "d.jsonl", rows))
    assert initial_value_targets(records) == [0.5, 0.5, 0.5, 0.0, 0.5, 0.5, 1.0]


def test_split_keeps_initial_states_whole_and_is_deterministic(tmp_path):
    rows = [{**GOOD, "reward": float(j % 2), "meta": {**GOOD["meta"], "seed": s}} for s in range(20) for j in range(3)]
    records = load_jsonl(write_lines(tmp_path / "d.jsonl", rows))
    train, val = split_by_group(records, 0.2, seed=1)
    assert len(val) == 4 * 3 and len(train) == 16 * 3
    assert not {r.group_key() for r in train} & {r.group_key() for r in val}
    assert split_by_group(records, 0.2, seed=1) == (train, val)
    assert split_by_group(records, 0.2, seed=2)[1] != val


def test_data_hash_changes_with_the_content(tmp_path):
    a = write_jsonl([GOOD], tmp_path / "a.jsonl")
    b = write_jsonl([{**GOOD, "reward": 0.0}], tmp_path / "b.jsonl")
    assert file_sha256(a) != file_sha256(b)
    assert len(file_sha256(a)) == 64
