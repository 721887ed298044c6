"""Format rewards for the R1 template ``<think> reasoning </think> <answer> answer </answer>``.

``format`` (strict, 0 or 1): the whole completion is one think block then one answer block, with
only whitespace around them, each tag exactly once, both blocks non-empty.
``format_partial`` (0, 0.25, ..., 1): 0.25 for each of ``<think>``, ``</think>``, ``<answer>``,
``</answer>`` that appears exactly once.

Templates that pre-fill ``<think>`` (the prompt ends with it, as many chat templates of reasoning
models do) put the opening tag in the prompt, so the completion must not repeat it; otherwise the
format reward is stuck at 0 (SPEC section 8, item 4). Both rewards handle this: ``think_prefilled``
may be given as a per-example field (``think_prefilled=[True, ...]``) or a single bool; when it is
absent it is detected per example from the prompt ending (after whitespace) with ``<think>``.
"""

from __future__ import annotations

import re
from typing import Sequence

from grpo_jax.rewards import register_reward

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
_STRICT = re.compile(r"^\s*<think>(.+?)</think>\s*<answer>(.+?)</answer>\s*$", re.DOTALL)


def prefilled_flags(prompts: Sequence[str], think_prefilled: bool | Sequence[bool] | None) -> list[bool]:
    """Per-example "the prompt already opened <think>" flags (explicit, or detected from the prompt)."""
    if think_prefilled is None:
        return [p.rstrip().endswith(THINK_OPEN) for p in prompts]
    if isinstance(think_prefilled, bool):
        return [think_prefilled] * len(prompts)
    flags = [bool(f) for f in think_prefilled]
    if len(flags) != len(prompts):
        raise ValueError(f"think_prefilled has {len(flags)} values for {len(prompts)} prompts")
    return flags


def _full_text(completion: str, prefilled: bool) -> str:
    return THINK_OPEN + completion if prefilled else completion


def is_strict_format(text: str) -> bool:
    """Whether ``text`` (with its opening ``<think>``) follows the strict R1 template."""
    m = _STRICT.match(text)
    return (
        m is not None
        and all(text.count(tag) == 1 for tag in TAGS)
        and bool(m.group(1).strip())
        and bool(m.group(2).strip())
    )


@register_reward("format")
def format_reward(
    prompts: list[str],
    completions: list[str],
    *,
    think_prefilled: bool | Sequence[bool] | None = None,
    **fields,
) -> list[float]:
    """1.0 if the completion follows the strict R1 template, else 0.0 (see module docstring)."""
    flags = prefilled_flags(prompts, think_prefilled)
    pairs = zip(completions, flags, strict=True)
    return [1.0 if is_strict_format(_full_text(c, f)) else 0.0 for c, f in pairs]


@register_reward("format_partial")
def format_partial_reward(
    prompts: list[str],
    completions: list[str],
    *,
    think_prefilled: bool | Sequence[bool] | None = None,
    **fields,
) -> list[float]:
    """0.25 for each R1 tag that appears exactly once (see module docstring)."""
    flags = prefilled_flags(prompts, think_prefilled)
    scores = []
    for completion, prefilled in zip(completions, flags, strict=True):
        text = _full_text(completion, prefilled)
        scores.append(0.25 * sum(text.count(tag) == 1 for tag in TAGS))
    return scores
