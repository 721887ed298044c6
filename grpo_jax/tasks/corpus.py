"""Synthetic "base model" text for the tiny experiments' pretraining.

A real base model has seen the R1 answer template in a minority of its text at most; this corpus
reproduces that: `template_fraction` of the documents answer as
`<think>3*4=12, 5+12=17</think> <answer>17</answer>`; the rest reason in plain text or answer
bare ("3*4=12, 5+12=17. The answer is 17.", "17"), which the accuracy reward does not accept.
The arithmetic is learned from every document, the tags from a few: as in R1-Zero, RL has to
teach the format, and the reasoning skill carries over."""

from __future__ import annotations

import random

from grpo_jax.tasks import Example, Task
from grpo_jax.tasks.templates import format_prompt

BARE_STYLES = (" {s}. The answer is {a}.", " {s}, so the answer is {a}.", " {s}. {a}", " {a}")


def _steps(example: Example) -> str:
    return ", ".join(example.get("steps") or [f"{example['question']} {example['answer']}"])


def r1_completion(example: Example) -> str:
    return f" <think>{_steps(example)}</think> <answer>{example['answer']}</answer>"


def bare_completion(example: Example, rng: random.Random) -> str:
    return rng.choice(BARE_STYLES).format(s=_steps(example), a=example["answer"])


def pretraining_pairs(task: Task, n: int, seed: int, *, template: str,
                      template_fraction: float) -> list[tuple[str, str]]:
    """n (prompt, completion) documents from the task's training split, deterministic in seed."""
    rng = random.Random(f"pretrain:{seed}")
    pairs = []
    for ex in task.train(n, seed=seed):
        completion = (r1_completion(ex) if rng.random() < template_fraction
                      else bare_completion(ex, rng))
        pairs.append((format_prompt(ex, template), completion))
    return pairs
