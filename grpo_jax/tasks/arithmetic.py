"""Synthetic arithmetic: "Compute 37+58*2." with the exact integer answer.

Expressions are random binary trees over integer operands; the value is computed on the tree while
it is built (Python ints, never eval of a string) and the text is printed with only the
parentheses that standard precedence needs, so reading the question gives the same value.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Union

from grpo_jax.tasks import (
    Example,
    check_fraction,
    check_range,
    register_task,
    sample_split,
    stable_id,
)

# A tree is an int leaf or (op, left, right).
Tree = Union[int, tuple[str, "Tree", "Tree"]]
PRECEDENCE = {"+": 1, "-": 1, "*": 2, "/": 2}


def tree_value(tree: Tree) -> int:
    """Exact value of a tree whose divisions are all exact."""
    if isinstance(tree, int):
        return tree
    op, a, b = tree
    x, y = tree_value(a), tree_value(b)
    if op == "+":
        return x + y
    if op == "-":
        return x - y
    if op == "*":
        return x * y
    if op == "/":
        if y == 0 or x % y:
            raise ValueError(f"inexact division {x}/{y}")
        return x // y
    raise ValueError(f"unknown operator {op!r}")


def tree_text(tree: Tree, spaced: bool = False) -> str:
    """Infix text with minimal parentheses under standard precedence and left associativity."""
    if isinstance(tree, int):
        return str(tree)
    op, a, b = tree
    p = PRECEDENCE[op]
    left, right = tree_text(a, spaced), tree_text(b, spaced)
    if not isinstance(a, int) and PRECEDENCE[a[0]] < p:
        left = f"({left})"
    # a-(b+c), a-(b-c), a/(b*c), a/(b/c) keep their parentheses; a+(b-c) and a*(b/c) do not.
    if not isinstance(b, int) and (
        PRECEDENCE[b[0]] < p or (PRECEDENCE[b[0]] == p and op in "-/")
    ):
        right = f"({right})"
    return f"{left} {op} {right}" if spaced else f"{left}{op}{right}"


def tree_steps(tree: Tree) -> list[str]:
    """The evaluation of a tree one operation at a time, innermost first: ["3*4=12", "5+12=17"].
    The built-in chain of thought of the tiny experiments."""
    if isinstance(tree, int):
        return []
    op, a, b = tree
    steps = tree_steps(a) + tree_steps(b)
    return steps + [f"{tree_value(a)}{op}{tree_value(b)}={tree_value(tree)}"]


def random_tree(leaves: list[int], ops: str, rng: random.Random) -> Tree:
    """A uniformly split random binary tree over `leaves` (in order) with random operators."""
    if len(leaves) == 1:
        return leaves[0]
    cut = rng.randint(1, len(leaves) - 1)
    op = rng.choice(ops)
    return (op, random_tree(leaves[:cut], ops, rng), random_tree(leaves[cut:], ops, rng))


@register_task("arithmetic")
@dataclasses.dataclass(frozen=True, kw_only=True)
class ArithmeticTask:
    """Integer arithmetic over + - *.

    digits:        (lo, hi) number of decimal digits of each operand (1 digit includes 0).
    operators:     a non-empty subset of "+-*".
    num_operands:  (lo, hi), 2 <= lo <= hi <= 4.
    allow_negative: when False, problems with a negative answer are redrawn.
    eval_fraction: share of the problem space (by hash of the question) that is eval-only.
    eval_seed:     seed of the fixed eval set.
    """

    name: str = "arithmetic"
    digits: tuple[int, int] = (1, 2)
    operators: str = "+-*"
    num_operands: tuple[int, int] = (2, 3)
    allow_negative: bool = True
    eval_fraction: float = 0.1
    eval_seed: int = 0

    def __post_init__(self) -> None:
        check_range("digits", self.digits, 1, 18)
        check_range("num_operands", self.num_operands, 2, 4)
        if not self.operators or set(self.operators) - set("+-*"):
            raise ValueError(
                f"operators must be a non-empty subset of '+-*', got {self.operators!r}"
            )
        check_fraction("eval_fraction", self.eval_fraction)

    def _operand(self, rng: random.Random) -> int:
        d = rng.randint(*self.digits)
        return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)

    def _draw(self, rng: random.Random) -> Example:
        while True:
            leaves = [self._operand(rng) for _ in range(rng.randint(*self.num_operands))]
            tree = random_tree(leaves, self.operators, rng)
            value = tree_value(tree)
            if self.allow_negative or value >= 0:
                break
        expression = tree_text(tree)
        question = f"Compute {expression}."
        return {
            "id": stable_id(self.name, question),
            "question": question,
            "answer": str(value),
            "expression": expression,
            "steps": tree_steps(tree),
        }

    def _split(self, n: int, rng: random.Random, split: str) -> list[Example]:
        return sample_split(
            self._draw, lambda ex: ex["question"], n, rng, split, self.eval_fraction, self.name
        )

    def train(self, n: int, seed: int) -> list[Example]:
        """n problems (with replacement) outside the eval split, deterministic in `seed`."""
        return self._split(n, random.Random(f"{self.name}:train:{seed}"), "train")

    def eval(self, n: int) -> list[Example]:
        """The first n distinct problems of the fixed eval set (a prefix of any larger eval)."""
        return self._split(n, random.Random(f"{self.name}:eval:{self.eval_seed}"), "eval")
