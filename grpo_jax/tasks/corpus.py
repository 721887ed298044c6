"""Synthetic "base model" text for the tiny experiments' pretraining.

A real base model has seen the R1 answer template in a minority of its text at most; this corpus
reproduces that: `template_fraction` of the documents answer as
`<think> 3*4=12, 5+12=17 </think> <answer> 17 </answer>`, the rest answer bare ("17",
"= 17", "The answer is 17."), which the accuracy reward does not accept."""

from __future__ import annotations

import random

from grpo_jax.tasks import Example, Task
from grpo_jax.tasks.templates import format_prompt

BARE_STYLES = (" {a}", " = {a}", " The answer is {a}.")


def r1_completion(example: Example) -> str:
    steps = ", ".join(example.get("steps") or [f"{example['question']} {example['answer']}"])
    return f" <think>{steps}</think> <answer>{example['answer']}</answer>"


def bare_completion(example: Example, rng: random.Random) -> str:
    return rng.choice(BARE_STYLES).format(a=example["answer"])


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
