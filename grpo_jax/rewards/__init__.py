"""Rule-based rewards (SPEC section 3) and their registry.

Every reward is a plain host-side function on decoded text::

    fn(prompts: list[str], completions: list[str], **fields) -> list[float]

``fields`` are per-example lists taken from the dataset or the trainer (``answer=[...]``,
``nums=[...]``, ``completion_length=[...]``); a reward reads the ones it needs and ignores the
rest, so every reward also takes ``**fields``. Rewards are combined by weight, with an explicit
failure policy, in :func:`grpo_jax.rewards.combine.score_completions`.

Registered names: ``accuracy``, ``format``, ``format_partial``, ``language``, ``countdown``,
``overlong``, ``cosine``, ``repetition``. Rewards with parameters (``overlong``, ``cosine``,
``repetition``) come from factories (``make_overlong_reward(...)`` etc.); register a configured
one under a new name, or replace the default with ``register_reward(name, overwrite=True)``.
"""

from __future__ import annotations

import difflib
from typing import Callable

RewardFn = Callable[..., list[float]]

REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str, *, overwrite: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator that registers ``fn`` under ``name``.

    A second registration under a taken name is an error (two tasks silently sharing a name is a
    bug), unless ``overwrite=True`` or it is the same function re-registered by a module reload.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")

    def decorator(fn: RewardFn) -> RewardFn:
        old = REWARDS.get(name)
        if old is not None and not overwrite and _qualified(old) != _qualified(fn):
            raise ValueError(
                f"reward {name!r} is already registered ({_qualified(old)}); "
                "pass overwrite=True to replace it"
            )
        REWARDS[name] = fn
        return fn

    return decorator


def get_reward(name: str) -> RewardFn:
    """The reward registered under ``name``; unknown names raise ValueError with a suggestion."""
    try:
        return REWARDS[name]
    except KeyError:
        known = sorted(REWARDS)
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown reward {name!r}; registered rewards: {known}.{hint}") from None


def _qualified(fn: RewardFn) -> str:
    code = getattr(fn, "__code__", None)
    line = f":{code.co_firstlineno}" if code is not None else ""
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}{line}"


# Importing the modules registers their rewards (they import the registry defined above).
from grpo_jax.rewards import countdown, format, language, length, math_answer  # noqa: E402,F401
from grpo_jax.rewards.combine import RewardError, RewardResult, score_completions  # noqa: E402
from grpo_jax.rewards.countdown import countdown_reward, evaluate_expression  # noqa: E402
from grpo_jax.rewards.format import format_partial_reward, format_reward  # noqa: E402
from grpo_jax.rewards.language import language_reward, language_share, script_of  # noqa: E402
from grpo_jax.rewards.length import (  # noqa: E402
    cosine_length_reward,
    make_cosine_reward,
    make_overlong_reward,
    make_repetition_reward,
    overlong_penalty,
    repetition_penalty,
)
from grpo_jax.rewards.math_answer import (  # noqa: E402
    accuracy_reward,
    answers_match,
    extract_answer,
    normalize_answer,
)

__all__ = [
    "REWARDS",
    "RewardError",
    "RewardFn",
    "RewardResult",
    "accuracy_reward",
    "answers_match",
    "cosine_length_reward",
    "countdown_reward",
    "evaluate_expression",
    "extract_answer",
    "format_partial_reward",
    "format_reward",
    "get_reward",
    "language_reward",
    "language_share",
    "make_cosine_reward",
    "make_overlong_reward",
    "make_repetition_reward",
    "normalize_answer",
    "overlong_penalty",
    "register_reward",
    "repetition_penalty",
    "score_completions",
    "script_of",
]
