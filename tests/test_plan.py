"""The shard plan is a pure function of sorted keys, sizes and limits."""
import pytest

from data_prep.plan import plan_shards


def _spans(plan):
    return [(p.start, p.stop) for p in plan]


def test_plan_by_count():
    keys = [f"{i:04d}" for i in range(10)]
    assert _spans(plan_shards(keys, [1] * 10, maxcount=4, maxsize=10**9)) == [(0, 4), (4, 8), (8, 10)]


def test_plan_by_size_and_oversized_sample_alone():
    keys = ["a", "b", "c", "d", "e"]
    plan = plan_shards(keys, [40, 40, 100, 10, 10], maxcount=100, maxsize=90)
    assert _spans(plan) == [(0, 2), (2, 3), (3, 5)]
    assert [p.name for p in plan] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]


def test_plan_is_deterministic_and_empty_input_gives_no_shards():
    keys = [f"k{i:03d}" for i in range(50)]
    sizes = [(i * 37) % 11 + 1 for i in range(50)]
    assert plan_shards(keys, sizes, 7, 30) == plan_shards(list(keys), list(sizes), 7, 30)
    assert plan_shards([], [], 10, 10) == []


def test_plan_refuses_unsorted_keys():
    with pytest.raises(ValueError, match="sorted"):
        plan_shards(["b", "a"], [1, 1], 10, 10)
