"""Weighted combination of registered rewards, with an explicit failure policy.

    total_N = sum_k weight_k * reward_k(prompts, completions, **fields)_N

A reward that raises, returns the wrong number of values, or returns NaN/inf must neither kill a
run silently nor poison the advantages (SPEC section 3). Every such failure is counted in
``RewardResult.failures``, logged, and then handled by ``on_error``:

- ``"zero"``: a reward that raises (or returns the wrong length) for the batch is retried one
  example at a time, so one bad completion scores 0 for that reward and the others keep their
  scores; NaN/inf values become 0. Each zeroed example counts as one failure.
- ``"raise"``: raise :class:`RewardError` naming the reward, the exception or bad value, and the
  offending completion (truncated).
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from grpo_jax.rewards import get_reward

log = logging.getLogger(__name__)

OnError = Literal["zero", "raise"]
_SHOW_CHARS = 300


class RewardError(RuntimeError):
    """A reward function failed under ``on_error="raise"``."""


@dataclasses.dataclass(frozen=True)
class RewardResult:
    """Scores of N completions: ``total`` is the weighted sum, ``per_reward`` the unweighted
    values (failed entries are 0), ``failures`` how many entries each reward failed on."""

    total: np.ndarray
    per_reward: dict[str, np.ndarray]
    failures: dict[str, int]


def score_completions(
    prompts: Sequence[str],
    completions: Sequence[str],
    fields: Mapping[str, Sequence[Any]],
    rewards: Mapping[str, float],
    on_error: OnError = "zero",
) -> RewardResult:
    """Score ``completions`` with the registered ``rewards`` (name -> weight); see module doc."""
    if on_error not in ("zero", "raise"):
        raise ValueError(f"on_error must be 'zero' or 'raise', got {on_error!r}")
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"got {len(prompts)} prompts for {n} completions")
    for key, values in fields.items():
        if len(values) != n:
            raise ValueError(f"field {key!r} has {len(values)} values for {n} completions")
    fns = {name: get_reward(name) for name in rewards}  # unknown names fail before any work

    total = np.zeros(n, dtype=np.float64)
    per_reward: dict[str, np.ndarray] = {}
    failures: dict[str, int] = {}
    for name, weight in rewards.items():
        values, n_failed = _run_one(name, fns[name], prompts, completions, fields, on_error)
        per_reward[name] = values
        failures[name] = n_failed
        total += float(weight) * values
    return RewardResult(total=total, per_reward=per_reward, failures=failures)


def _run_one(name, fn, prompts, completions, fields, on_error) -> tuple[np.ndarray, int]:
    n = len(completions)
    problems: list[str] = []  # one message per zeroed example; logged once per call, not N times
    try:
        out = _as_floats(fn(list(prompts), list(completions), **{k: list(v) for k, v in fields.items()}))
        if len(out) != n:
            raise ValueError(f"returned {len(out)} values for {n} completions")
    except Exception as batch_exc:  # noqa: BLE001 - every failure is counted, logged, raised or zeroed
        # Find the offending example(s) one at a time, so that one bad completion costs only itself.
        out = []
        for i in range(n):
            try:
                one = {k: [v[i]] for k, v in fields.items()}
                vals = _as_floats(fn([prompts[i]], [completions[i]], **one))
                if len(vals) != 1:
                    raise ValueError(f"returned {len(vals)} values for 1 completion")
                out.append(vals[0])
            except Exception as exc:  # noqa: BLE001
                if on_error == "raise":
                    raise RewardError(_message(name, exc, completions[i], i)) from exc
                problems.append(_message(name, exc, completions[i], i))
                out.append(0.0)
        if not problems:  # the batch call failed but every single example works: a batch-level bug
            if on_error == "raise":
                raise RewardError(f"reward {name!r} failed on the batch of {n} but on no single "
                                  f"example: {type(batch_exc).__name__}: {batch_exc}") from batch_exc
            log.warning("reward %r failed on the batch (%s: %s) but on no single example; "
                        "using per-example scores", name, type(batch_exc).__name__, batch_exc)

    values = np.asarray(out, dtype=np.float64)
    for i in np.flatnonzero(~np.isfinite(values)):
        msg = _message(name, f"non-finite value {values[i]}", completions[i], int(i))
        if on_error == "raise":
            raise RewardError(msg)
        problems.append(msg)
        values[i] = 0.0
    if problems:
        more = f" (and {len(problems) - 1} more in this batch)" if len(problems) > 1 else ""
        log.warning("%s; scored 0 for %d of %d completions%s", problems[0], len(problems), n, more)
    return values, len(problems)


def _as_floats(out: Any) -> list[float]:
    """Reward output as a list of floats; a non-numeric entry raises TypeError."""
    if isinstance(out, (str, bytes)) or not hasattr(out, "__len__"):
        raise TypeError(f"expected a list of floats, got {type(out).__name__}")
    vals = []
    for v in out:
        if not isinstance(v, numbers.Real):
            raise TypeError(f"expected float values, got {type(v).__name__} {v!r}")
        vals.append(float(v))
    return vals


def _message(name: str, problem: Any, completion: str, index: int) -> str:
    if isinstance(problem, BaseException):
        problem = f"{type(problem).__name__}: {problem}"
    text = completion if len(completion) <= _SHOW_CHARS else completion[:_SHOW_CHARS] + "...[truncated]"
    return f"reward {name!r} failed on completion {index} ({problem}); completion: {text!r}"

