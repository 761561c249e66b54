"""progress and aggregates on hand-made values (README.md)."""

import math

import pytest

from service.engine.postprocess import aggregate, rank, step_scores


def test_progress_is_the_difference_of_promises_starting_from_the_initial_value():
    steps = step_scores([0.5, 0.75, 0.25], initial_value=0.4)
    assert [s.promise for s in steps] == [0.5, 0.75, 0.25]
    assert [s.progress for s in steps] == pytest.approx([0.1, 0.25, -0.5])


@pytest.mark.parametrize("how,expected", [("last", 0.25), ("min", 0.25), ("mean", 0.5), ("prod", 0.5 * 0.75 * 0.25)])
def test_aggregates(how, expected):
    assert aggregate([0.5, 0.75, 0.25], how) == pytest.approx(expected)


def test_aggregate_rejects_unknown_and_empty():
    with pytest.raises(ValueError, match="unknown aggregate 'max'"):
        aggregate([0.5], "max")
    with pytest.raises(ValueError, match="empty"):
        aggregate([], "last")


def test_rank_is_best_first_and_stable_with_top_n():
    assert rank([0.2, 0.9, 0.5, 0.9]) == [1, 3, 2, 0]
    assert rank([0.2, 0.9, 0.5], top_n=2) == [1, 2]
    assert math.isclose(aggregate([1.0], "prod"), 1.0)
