"""The arithmetic of a training mix: targets per component, what exists, shortfalls, the documents taken.

Plan before write: every component's target is fixed from the recipe before a byte is written, and
a component that cannot reach its target within its epoch cap is a shortfall, in tokens, reported up
front: the run fails (`on_shortfall: fail`), or the whole mix shrinks until every component fits with
its ratio kept (`shrink`), or a short component gives all it has while the others keep their targets
(`take_available`, which changes the ratios and says by how much). Nothing is ever padded.

The token rule (one rule, everywhere): a component takes whole passes over its documents, each pass in
its own seeded order, and in the last pass it takes, in that order, every document that still fits,
passing over one that does not. So a component has at most its target and falls short of it by less
than one document (any one it passed over in its last pass would have overshot).
"""

from __future__ import annotations

import hashlib
import math
import random
from array import array
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Part:
    """One component as the plan sees it: its origin, ratio, epoch cap and the tokens of one pass."""

    origin: str
    ratio: float
    max_epochs: int
    available: int


@dataclass(frozen=True)
class PartPlan:
    origin: str
    ratio: float
    max_epochs: int
    available: int
    target: int

    @property
    def capacity(self) -> int:
        return self.available * self.max_epochs

    @property
    def shortfall(self) -> int:
        return max(0, self.target - self.capacity)


@dataclass
class MixPlan:
    total: int
    parts: list[PartPlan]
    requested_total: int
    shortfalls: dict[str, int] = field(default_factory=dict)  # origin -> tokens missing at the requested total

    @property
    def shrunk(self) -> bool:
        return self.total < self.requested_total

    def describe(self) -> dict:
        return {
            "requested_tokens": self.requested_total, "planned_tokens": self.total, "shrunk": self.shrunk,
            "shortfalls": self.shortfalls,
            "components": {p.origin: {"ratio": p.ratio, "target": p.target, "available": p.available, "max_epochs": p.max_epochs}
                           for p in self.parts},
        }  # fmt: skip


class MixShortfall(ValueError):
    """A component cannot reach its target within its epoch cap; raised before anything is written."""

    def __init__(self, plan: MixPlan) -> None:
        self.plan = plan
        lines = [
            f"{p.origin}: needs {p.target:,} tokens, has {p.available:,} x {p.max_epochs} epoch(s) = {p.capacity:,}, "
            f"short by {p.shortfall:,}"
            for p in plan.parts
            if p.shortfall
        ]
        super().__init__("the mix cannot be made as asked (nothing was written): " + "; ".join(lines))


def split(total: int, ratios: list[float]) -> list[int]:
    """`total` tokens split by `ratios` into integers that sum to `total` (largest remainders)."""
    weight = sum(ratios)
    exact = [total * r / weight for r in ratios]
    out = [math.floor(x) for x in exact]
    for i in sorted(range(len(ratios)), key=lambda i: (-(exact[i] - out[i]), i))[: total - sum(out)]:
        out[i] += 1
    return out


def _plan_at(parts: list[Part], total: int) -> list[PartPlan]:
    targets = split(total, [p.ratio for p in parts])
    return [PartPlan(p.origin, p.ratio, p.max_epochs, p.available, t) for p, t in zip(parts, targets, strict=True)]


def plan_mix(
    parts: list[Part], *, target_tokens: int | None = None, target_originals: float | None = None, on_shortfall: str = "fail"
) -> MixPlan:
    """Targets per component. With neither target, every component is taken once, whole."""
    if not parts:
        raise ValueError("a mix needs at least one component")
    if target_tokens is None and target_originals is None:
        planned = [PartPlan(p.origin, p.ratio, 1, p.available, p.available) for p in parts]
        total = sum(p.available for p in parts)
        return MixPlan(total, planned, total)
    if target_tokens is not None:
        requested = target_tokens
    else:
        originals = next(p for p in parts if p.origin == "original")
        requested = round(target_originals * originals.available)  # type: ignore[operator]
    planned = _plan_at(parts, requested)
    shortfalls = {p.origin: p.shortfall for p in planned if p.shortfall}
    if not shortfalls:
        return MixPlan(requested, planned, requested)
    if on_shortfall == "take_available":  # short components give all they can; the others keep their targets
        planned = [PartPlan(p.origin, p.ratio, p.max_epochs, p.available, min(p.target, p.capacity)) for p in planned]
        return MixPlan(sum(p.target for p in planned), planned, requested, shortfalls)
    if on_shortfall != "shrink":
        raise MixShortfall(MixPlan(requested, planned, requested, shortfalls))
    weight = sum(p.ratio for p in parts)
    total = min(requested, *(math.floor(p.available * p.max_epochs * weight / p.ratio) for p in parts))
    planned = _plan_at(parts, total)
    while any(p.shortfall for p in planned):  # rounding of the split can ask one token too many
        total -= 1
        planned = _plan_at(parts, total)
    return MixPlan(total, planned, requested, shortfalls)


def _order(n: int, seed: int, origin: str, epoch: int) -> array:
    """A seeded permutation of range(n): `random.shuffle` over a packed array (8 bytes a row, not a list's
    ~36), which draws and swaps exactly as over a list, so every mix made before keeps its order."""
    rng = random.Random(hashlib.sha256(f"{seed}:{origin}:{epoch}".encode()).digest())
    order = array("q", range(n))
    rng.shuffle(order)  # type: ignore[arg-type]
    return order


def take(tokens: Sequence[int], target: int, max_epochs: int, seed: int, origin: str) -> array:
    """Indices of the documents a component takes (a document once per pass it is in), by the token rule."""
    out = array("q")
    total = 0
    for epoch in range(max_epochs):
        passed_over = False
        for i in _order(len(tokens), seed, origin, epoch):
            if total + tokens[i] > target:
                passed_over = True
                continue
            out.append(i)
            total += tokens[i]
        if passed_over:  # this was the last pass: a next one would only take what fits the same way
            return out
    return out


def shuffled(n: int, seed: int) -> array:
    """The mix's row order: one seeded permutation of all rows taken."""
    return _order(n, seed, "mix", 0)


def shard_bounds(tokens: list[int], shard_tokens: int) -> list[tuple[int, int]]:
    """(start, end) row ranges: a shard is closed before the row that would take it over `shard_tokens`
    (a row longer than a shard has one to itself); only the last shard may be smaller."""
    bounds: list[tuple[int, int]] = []
    start, size = 0, 0
    for i, n in enumerate(tokens):
        if size and size + n > shard_tokens:
            bounds.append((start, i))
            start, size = i, 0
        size += n
    if start < len(tokens):
        bounds.append((start, len(tokens)))
    return bounds
