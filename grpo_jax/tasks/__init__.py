"""Tasks: where prompts and gold answers come from (host side, pure Python).

An `Example` is a plain dict with at least
    id        stable string: the same problem always gets the same id
    question  the problem text, without any prompt template
    answer    the gold answer as a string
plus task-specific fields (countdown: `nums`, `target`, `solution`), which the trainer passes to
reward functions as keyword arguments.

A task has a `name`, `train(n, seed)` (n training examples, a deterministic function of the seed)
and `eval(n)` (the first n problems of a fixed held-out set). Every built-in task keeps the two
apart: a problem is eval-only when a SHA-256 hash of its canonical key falls below
`eval_fraction`, and `train()` never yields such a problem.

    task = get_task("countdown", num_range=(1, 9))
    batch = task.train(64, seed=step)
"""

from __future__ import annotations

import difflib
import hashlib
import random
from typing import Any, Callable, Literal, Protocol, runtime_checkable

Example = dict[str, Any]


@runtime_checkable
class Task(Protocol):
    name: str

    def train(self, n: int, seed: int) -> list[Example]: ...

    def eval(self, n: int) -> list[Example]: ...


TASKS: dict[str, Callable[..., Task]] = {}


def register_task(name: str) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    """Decorator: register a task factory (a class or function taking keyword arguments)."""

    def deco(factory: Callable[..., Task]) -> Callable[..., Task]:
        if name in TASKS and TASKS[name] is not factory:
            raise ValueError(f"task {name!r} is already registered by {TASKS[name]!r}")
        TASKS[name] = factory
        return factory

    return deco


def get_task(name: str, **kwargs: Any) -> Task:
    """Build the registered task `name` with `kwargs`; unknown names list the known ones."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown task {name!r}; registered tasks: {sorted(TASKS)}.{hint}")
    return TASKS[name](**kwargs)


def _hash_unit(key: str) -> float:
    """A stable number in [0, 1) from a string (hashlib, not the per-process salted hash())."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def in_eval_split(key: str, eval_fraction: float) -> bool:
    """True when the problem with canonical `key` belongs to the held-out split."""
    return _hash_unit(key) < eval_fraction


def stable_id(prefix: str, key: str) -> str:
    """`<prefix>-<12 hex digits>`: a content id, identical across runs and machines."""
    return f"{prefix}-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:12]}"


def check_fraction(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {value}")


def check_range(name: str, lo_hi: tuple[int, int], low: int, high: int | None = None) -> None:
    lo, hi = lo_hi
    if lo > hi or lo < low or (high is not None and hi > high):
        allowed = f"{low} <= lo <= hi" + (f" <= {high}" if high is not None else "")
        raise ValueError(f"{name} must be (lo, hi) with {allowed}, got {lo_hi}")


def sample_split(
    draw: Callable[[random.Random], Example],
    key: Callable[[Example], str],
    n: int,
    rng: random.Random,
    split: Literal["train", "eval"],
    eval_fraction: float,
    what: str,
) -> list[Example]:
    """Draw n examples from a generator, keeping only those of `split`.

    The eval split is deduplicated (a held-out set of distinct problems); the train split samples
    with replacement. Both give up with an error when the problem space is too small for the
    request instead of looping forever.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out: list[Example] = []
    seen: set[str] = set()
    patience = 20_000  # draws without progress before we call the space exhausted
    misses = 0
    while len(out) < n:
        ex = draw(rng)
        k = key(ex)
        wanted = in_eval_split(k, eval_fraction) == (split == "eval")
        if wanted and not (split == "eval" and k in seen):
            out.append(ex)
            seen.add(k)
            misses = 0
            continue
        misses += 1
        if misses >= patience:
            raise ValueError(
                f"{what}: found only {len(out)} of {n} {split} problems after {patience} draws "
                f"without a new one; widen the problem space or change eval_fraction "
                f"({eval_fraction})"
            )
    return out


# Import the built-in tasks so that they register themselves.
from grpo_jax.tasks import arithmetic, countdown, files  # noqa: E402,F401
from grpo_jax.tasks.templates import (  # noqa: E402
    R1_ZERO_TEMPLATE,
    chat_prompt,
    format_prompt,
    r1_zero_prompt,
)

__all__ = [
    "Example",
    "R1_ZERO_TEMPLATE",
    "TASKS",
    "Task",
    "chat_prompt",
    "format_prompt",
    "get_task",
    "in_eval_split",
    "r1_zero_prompt",
    "register_task",
    "stable_id",
]
