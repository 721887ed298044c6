"""Length shaping and repetition rewards: DAPO overlong penalty, cosine-scaled length reward,
n-gram repetition penalty.

Lengths are completion token counts, which the trainer passes as the per-example field
``completion_length``. Parameterized rewards come from factories; the registered defaults
(``overlong``, ``cosine``, ``repetition``) use the values in their docstrings. For another
budget, register your own, e.g. ``register_reward("overlong", overwrite=True)(
make_overlong_reward(max_len=4096, cache_len=512))``.
"""

from __future__ import annotations

import math
from typing import Callable

from grpo_jax.rewards import register_reward
from grpo_jax.rewards.math_answer import answers_match, extract_answer

RewardFn = Callable[..., list[float]]


def overlong_penalty(length: int, max_len: int, cache_len: int) -> float:
    """DAPO soft overlong punishment (DAPO, sec. 3.4), with L_max = max_len, L_cache = cache_len:

        R(y) = 0                                  if |y| <= L_max - L_cache
               ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
               -1                                 if |y| > L_max
    """
    if not 0 <= cache_len <= max_len:
        raise ValueError(f"need 0 <= cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    start = max_len - cache_len
    if length <= start:
        return 0.0
    if length <= max_len:
        return (start - length) / cache_len
    return -1.0


def make_overlong_reward(max_len: int, cache_len: int) -> RewardFn:
    """The overlong penalty as a reward over the field ``completion_length``."""
    overlong_penalty(0, max_len, cache_len)  # validate now, not on the first batch

    def overlong_reward(prompts, completions, *, completion_length, **fields) -> list[float]:
        return [overlong_penalty(int(n), max_len, cache_len) for n in completion_length]

    overlong_reward.__qualname__ = f"overlong_reward[max_len={max_len},cache_len={cache_len}]"
    return overlong_reward


def cosine_length_reward(
    length: int,
    correct: bool,
    max_len: int,
    *,
    correct_short: float = 1.0,
    correct_long: float = 0.5,
    wrong_short: float = -1.0,
    wrong_long: float = -0.5,
    exceed: float | None = None,
) -> float:
    """Cosine-scaled length reward (Yeo et al. 2025, "Demystifying Long Chain-of-Thought
    Reasoning in LLMs"), with t = length, T = max_len:

        r(t) = r_T + 0.5 * (r_0 - r_T) * (1 + cos(pi * t / T))

    r_0, r_T = (correct_short, correct_long) when correct, (wrong_short, wrong_long) when wrong:
    correct answers earn more when short, wrong ones are penalized less when long (more thinking
    on a hard problem is not punished). ``exceed`` (the paper's r_e) replaces the value when
    t >= T; None keeps the curve's end value. The defaults are open-r1's (scaled to a 0/1
    accuracy); the paper uses r_0^c=2, r_T^c=1, r_0^w=-10, r_T^w=0, r_e=-10.
    """
    if max_len <= 0:
        raise ValueError(f"max_len must be > 0, got {max_len}")
    if exceed is not None and length >= max_len:
        return float(exceed)
    r0, r_end = (correct_short, correct_long) if correct else (wrong_short, wrong_long)
    t = min(max(length, 0), max_len)
    return r_end + 0.5 * (r0 - r_end) * (1.0 + math.cos(math.pi * t / max_len))


def make_cosine_reward(max_len: int, **params: float | None) -> RewardFn:
    """``cosine_length_reward`` over fields ``completion_length`` and ``answer`` (correctness
    is the accuracy reward's ``answers_match``)."""
    cosine_length_reward(0, True, max_len, **params)  # validate now

    def cosine_reward(prompts, completions, *, completion_length, answer, **fields) -> list[float]:
        return [
            cosine_length_reward(int(n), answers_match(extract_answer(c), a), max_len, **params)
            for c, n, a in zip(completions, completion_length, answer, strict=True)
        ]

    cosine_reward.__qualname__ = f"cosine_reward[max_len={max_len}]"
    return cosine_reward


def repetition_penalty(text: str, n: int = 3, max_penalty: float = 1.0) -> float:
    """-max_penalty * (share of repeated word n-grams) = -max_penalty * (1 - unique / total);
    0 for text shorter than n words. Catches the "collapse into repeated tokens" failure."""
    if n < 1 or max_penalty < 0:
        raise ValueError(f"need n >= 1 and max_penalty >= 0, got n={n}, max_penalty={max_penalty}")
    words = text.lower().split()
    ngrams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not ngrams:
        return 0.0
    return -max_penalty * (1.0 - len(set(ngrams)) / len(ngrams))


def make_repetition_reward(n: int = 3, max_penalty: float = 1.0) -> RewardFn:
    """``repetition_penalty`` of each whole completion as a reward."""
    repetition_penalty("", n, max_penalty)  # validate now

    def repetition_reward(prompts, completions, **fields) -> list[float]:
        return [repetition_penalty(c, n, max_penalty) for c in completions]

    repetition_reward.__qualname__ = f"repetition_reward[n={n},max_penalty={max_penalty}]"
    return repetition_reward


# Registered defaults: DeepSeekMath's 1024-token budget with a 256-token soft zone (DAPO used
# 20480 / 4096); set your own budget with the factories.
register_reward("overlong")(make_overlong_reward(max_len=1024, cache_len=256))
register_reward("cosine")(make_cosine_reward(max_len=1024))
register_reward("repetition")(make_repetition_reward(n=3, max_penalty=1.0))
