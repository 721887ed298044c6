"""Countdown (TinyZero): reach a target with 3-4 given numbers, each used exactly once.

The target is the value of a random expression over all the numbers, so every problem has a
solution; one is stored as `solution`. Division is used only where it is exact, so the solution
is correct under exact (rational) arithmetic and under integer arithmetic alike.
"""

from __future__ import annotations

import dataclasses
import random

from grpo_jax.tasks import (
    Example,
    check_fraction,
    check_range,
    register_task,
    sample_split,
    stable_id,
)
from grpo_jax.tasks.arithmetic import Tree, tree_text


def _apply(op: str, x: int, y: int) -> int:
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    return x // y  # "/" is only chosen when exact


def random_solution(leaves: list[int], ops: str, rng: random.Random) -> tuple[Tree, int]:
    """A random expression tree using every leaf once, and its exact value."""
    if len(leaves) == 1:
        return leaves[0], leaves[0]
    cut = rng.randint(1, len(leaves) - 1)
    a, x = random_solution(leaves[:cut], ops, rng)
    b, y = random_solution(leaves[cut:], ops, rng)
    valid = [op for op in ops if op != "/" or (y != 0 and x % y == 0)]
    op = rng.choice(valid)
    return (op, a, b), _apply(op, x, y)


def countdown_key(nums: list[int], target: int) -> str:
    """Canonical problem key: the order in which the numbers are shown does not matter."""
    return f"{sorted(nums)}->{target}"


@register_task("countdown")
@dataclasses.dataclass(frozen=True, kw_only=True)
class CountdownTask:
    """Countdown problems.

    num_range:     (lo, hi) inclusive range of the given numbers (TinyZero: 1..99; 1..9 is easy).
    count:         (lo, hi) how many numbers, 2 <= lo <= hi <= 6 (TinyZero: 3..4).
    operators:     subset of "+-*/" with at least one of "+-*".
    max_target:    targets are integers in [1, max_target]; other draws are redrawn.
    eval_fraction: share of the problem space (by hash of sorted numbers and target) that is
                   eval-only.
    eval_seed:     seed of the fixed eval set.
    """

    name: str = "countdown"
    num_range: tuple[int, int] = (1, 99)
    count: tuple[int, int] = (3, 4)
    operators: str = "+-*/"
    max_target: int = 100
    eval_fraction: float = 0.1
    eval_seed: int = 0

    def __post_init__(self) -> None:
        check_range("num_range", self.num_range, 1)
        check_range("count", self.count, 2, 6)
        ops = set(self.operators)
        if not ops or ops - set("+-*/") or not ops & set("+-*"):
            raise ValueError(
                f"operators must be a subset of '+-*/' with one of '+-*', got {self.operators!r}"
            )
        if self.max_target < 1:
            raise ValueError(f"max_target must be >= 1, got {self.max_target}")
        check_fraction("eval_fraction", self.eval_fraction)

    def _draw(self, rng: random.Random) -> Example:
        while True:
            nums = [rng.randint(*self.num_range) for _ in range(rng.randint(*self.count))]
            leaves = rng.sample(nums, len(nums))  # the solution's order is not the shown order
            tree, target = random_solution(leaves, self.operators, rng)
            if 1 <= target <= self.max_target:
                break
        ops = ", ".join(op for op in "+-*/" if op in self.operators)
        question = (
            f"Using the numbers {nums}, create an equation that equals {target}. You can use "
            f"basic arithmetic operations ({ops}) and each number can only be used once."
        )
        return {
            "id": stable_id(self.name, countdown_key(nums, target)),
            "question": question,
            "answer": str(target),
            "nums": nums,
            "target": target,
            "solution": tree_text(tree, spaced=True),
        }

    def _split(self, n: int, rng: random.Random, split: str) -> list[Example]:
        key = lambda ex: countdown_key(ex["nums"], ex["target"])  # noqa: E731
        return sample_split(self._draw, key, n, rng, split, self.eval_fraction, self.name)

    def train(self, n: int, seed: int) -> list[Example]:
        """n problems (with replacement) outside the eval split, deterministic in `seed`."""
        return self._split(n, random.Random(f"{self.name}:train:{seed}"), "train")

    def eval(self, n: int) -> list[Example]:
        """The first n distinct problems of the fixed eval set (a prefix of any larger eval)."""
        return self._split(n, random.Random(f"{self.name}:eval:{self.eval_seed}"), "eval")
