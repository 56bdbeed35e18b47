"""The budget allocator: exact against brute force, budget edge cases, rules, determinism."""

from __future__ import annotations

import itertools
import random

import pytest

from tqc.allocate import BudgetError, Choice, allocate, smallest_bytes, total


def random_instance(rng: random.Random, layers: int, options: int) -> dict[str, list[Choice]]:
    """Random layers whose options trade bytes for damage (more bytes, less damage, with noise)."""
    instance = {}
    for i in range(layers):
        sizes = sorted(rng.sample(range(10, 400), options))
        damages = sorted((rng.uniform(0, 5) for _ in range(options)), reverse=True)
        instance[f"layer{i}"] = [Choice(f"o{j}", s, d) for j, (s, d) in enumerate(zip(sizes, damages))]
    return instance


def brute_force(candidates: dict[str, list[Choice]], room: int) -> float | None:
    best = None
    for combo in itertools.product(*candidates.values()):
        if sum(c.bytes for c in combo) <= room:
            damage = sum(c.damage for c in combo)
            best = damage if best is None else min(best, damage)
    return best


@pytest.mark.parametrize("seed", range(25))
def test_matches_brute_force_on_random_instances(seed):
    rng = random.Random(seed)
    candidates = random_instance(rng, layers=rng.randint(2, 5), options=rng.randint(2, 4))
    low = smallest_bytes(candidates)
    high = sum(max(c.bytes for c in cs) for cs in candidates.values())
    room = rng.randint(low, high)
    picked = allocate(candidates, room)
    used, damage = total(picked)
    assert used <= room
    assert set(picked) == set(candidates)
    assert all(picked[name] in candidates[name] for name in candidates)
    assert damage == pytest.approx(brute_force(candidates, room), rel=1e-9, abs=1e-12)


def test_budget_exactly_met_and_one_byte_short():
    candidates = random_instance(random.Random(7), layers=6, options=3)
    fixed = 1000
    exact = smallest_bytes(candidates) + fixed
    picked = allocate(candidates, exact, fixed)
    assert total(picked)[0] + fixed == exact
    with pytest.raises(BudgetError) as err:
        allocate(candidates, exact - 1, fixed)
    message = str(err.value)
    assert "\n" not in message
    assert f"({exact} bytes" in message  # states the smallest budget that can be met
    assert f"({exact - 1} bytes)" in message


def test_generous_budget_takes_least_damage_everywhere():
    candidates = random_instance(random.Random(3), layers=8, options=4)
    picked = allocate(candidates, 10**9)
    for name, choice in picked.items():
        assert choice.damage == min(c.damage for c in candidates[name])


def test_same_input_same_choice():
    candidates = random_instance(random.Random(11), layers=30, options=9)
    room = (smallest_bytes(candidates) + sum(max(c.bytes for c in cs) for cs in candidates.values())) // 2
    assert allocate(candidates, room) == allocate(dict(candidates), room)


def test_layer_without_options_is_an_error():
    with pytest.raises(BudgetError, match="layer 'a' has no allowed option"):
        allocate({"a": [], "b": [Choice("4", 1, 0.0)]}, 100)
