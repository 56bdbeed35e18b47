"""The allocator: per-layer options that fit a byte budget with the least summed damage.

A multiple-choice knapsack: each layer takes exactly one of its candidate choices (option, bytes,
damage); the bytes must fit the capacity; the summed damage is minimised. It is solved exactly as
a 0/1 integer program with scipy's MILP (HiGHS, relative gap 0), and the result is checked in exact
integer arithmetic. A pure function: the same candidates and capacity give the same choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from .memory import format_size


class BudgetError(ValueError):
    """No choice of options fits the budget; the message states the smallest budget that does."""


@dataclass(frozen=True)
class Choice:
    option: str
    bytes: int
    damage: float


def smallest_bytes(candidates: dict[str, list[Choice]]) -> int:
    """Bytes of the plan that takes every layer's smallest candidate."""
    return sum(min(c.bytes for c in choices) for choices in candidates.values())


def allocate(candidates: dict[str, list[Choice]], capacity: int, fixed: int = 0) -> dict[str, Choice]:
    """The choice per layer of least total damage with total bytes <= capacity - fixed.

    `capacity` is the whole budget and `fixed` the bytes that do not depend on the choice, so the
    error for an impossible budget can state the smallest whole budget that can be met.
    """
    empty = [name for name, choices in candidates.items() if not choices]
    if empty:
        raise BudgetError(f"layer '{empty[0]}' has no allowed option")
    room = capacity - fixed
    need = smallest_bytes(candidates)
    if need > room:
        raise BudgetError(
            f"budget {format_size(capacity)} ({capacity} bytes) cannot be met: the smallest plan needs "
            f"{format_size(need + fixed)} ({need + fixed} bytes: {need} in linear layers at their smallest "
            f"allowed options + {fixed} fixed)"
        )
    names = list(candidates)
    limit = room
    for _ in range(8):  # tolerance in the LP solver could let a plan overshoot by a few bytes
        picked = _solve(names, candidates, limit)
        used = sum(choice.bytes for choice in picked.values())
        if used <= room:
            return picked
        limit -= used - room
    raise BudgetError(f"the solver found no plan within {room} bytes")  # pragma: no cover


def _solve(names: list[str], candidates: dict[str, list[Choice]], room: int) -> dict[str, Choice]:
    flat = [(i, choice) for i, name in enumerate(names) for choice in candidates[name]]
    damage = np.array([choice.damage for _, choice in flat], dtype=np.float64)
    scale = float(np.abs(damage).max()) or 1.0
    sizes = np.array([choice.bytes for _, choice in flat], dtype=np.float64)
    rows = np.array([i for i, _ in flat])
    one_each = csr_array((np.ones(len(flat)), (rows, np.arange(len(flat)))), shape=(len(names), len(flat)))
    constraints = [
        LinearConstraint(one_each, 1, 1),
        LinearConstraint(sizes[None, :], -np.inf, room),
    ]
    result = milp(
        c=damage / scale * 1e3,
        constraints=constraints,
        integrality=np.ones(len(flat)),
        bounds=Bounds(0, 1),
        options={"mip_rel_gap": 0.0, "presolve": True},
    )
    if result.x is None:
        raise BudgetError(f"the solver found no plan within {room} bytes ({result.message})")
    chosen = np.round(result.x).astype(bool)
    picked = {}
    for (i, choice), taken in zip(flat, chosen):
        if taken:
            picked[names[i]] = choice
    return picked


def total(picked: dict[str, Choice]) -> tuple[int, float]:
    """(bytes, damage) of a choice."""
    return sum(c.bytes for c in picked.values()), sum(c.damage for c in picked.values())
