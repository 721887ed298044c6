"""Synthetic "base model" text for the tiny experiments' pretraining.

A real base model has seen the R1 answer template in a minority of its text at most; this corpus
reproduces that: `template_fraction` of the documents answer as
`<think>3*4=12, 5+12=17</think> <answer>17</answer>`; the rest reason in plain text or answer
bare ("3*4=12, 5+12=17. The answer is 17.", "17"), which the accuracy reward does not accept.
The arithmetic is learned from every document, the tags from a few: as in R1-Zero, RL has to
teach the format, and the reasoning skill carries over."""

from __future__ import annotations

import random
import re

from grpo_jax.tasks import Example, Task
from grpo_jax.tasks.templates import format_prompt

BARE_STYLES = (" {s}. The answer is {a}.", " {s}, so the answer is {a}.", " {s}. {a}", " {a}")

# Reasoning in words ("4 times 5 is 20") can be written in two scripts for the same words: Latin,
# or a letter-for-letter Greek transliteration ("4 τιμεσ 5 ισ 20"). A corpus that switches script
# from step to step is the tiny stand-in for the language mixing DeepSeek-R1-Zero shows; the
# language reward (share of Latin letters in the reasoning) measures it.
WORDS = {"+": "plus", "-": "minus", "*": "times", "=": "is"}
GREEK = str.maketrans("aeiouhklmnpst", "αειουηκλμνπστ")
SECOND_SCRIPT_CHARS = "".join(sorted(set("αειουηκλμνπστ")))
_STEP = re.compile(r"^(-?\d+)([+*-])(-?\d+)=(-?\d+)$")


def step_words(step: str, greek: bool = False) -> str:
    """ "4*5=20" -> "4 times 5 is 20" (Latin) or "4 τιμεσ 5 ισ 20" (greek=True)."""
    m = _STEP.match(step)
    if m is None:
        raise ValueError(f"not an arithmetic step: {step!r}")
    a, op, b, c = m.groups()
    text = f"{a} {WORDS[op]} {b} {WORDS['=']} {c}"
    return text.translate(GREEK) if greek else text


def _steps(example: Example, *, words: bool = False, second_script: float = 0.0,
           rng: random.Random | None = None) -> str:
    steps = example.get("steps") or [f"{example['question']} {example['answer']}"]
    if words:
        steps = [step_words(s, greek=rng is not None and rng.random() < second_script) for s in steps]
    return ", ".join(steps)


def r1_completion(example: Example, *, words: bool = False, second_script: float = 0.0,
                  rng: random.Random | None = None) -> str:
    steps = _steps(example, words=words, second_script=second_script, rng=rng)
    return f" <think>{steps}</think> <answer>{example['answer']}</answer>"


def bare_completion(example: Example, rng: random.Random, *, words: bool = False,
                    second_script: float = 0.0) -> str:
    steps = _steps(example, words=words, second_script=second_script, rng=rng)
    return rng.choice(BARE_STYLES).format(s=steps, a=example["answer"])


def pretraining_pairs(task: Task, n: int, seed: int, *, template: str, template_fraction: float,
                      words: bool = False, second_script: float = 0.0) -> list[tuple[str, str]]:
    """n (prompt, completion) documents from the task's training split, deterministic in seed.
    `words`: the reasoning in words, each step in the second script with probability
    `second_script`."""
    rng = random.Random(f"pretrain:{seed}")
    pairs = []
    for ex in task.train(n, seed=seed):
        kw = dict(words=words, second_script=second_script)
        completion = (r1_completion(ex, rng=rng, **kw) if rng.random() < template_fraction
                      else bare_completion(ex, rng, **kw))
        pairs.append((format_prompt(ex, template), completion))
    return pairs


def curated_pairs(task: Task, n: int, seed: int, *, template: str,
                  words: bool = True) -> list[tuple[str, str]]:
    """DeepSeek-R1's cold-start data in miniature: n correct, readable answers in the R1 format,
    reasoning in one script (Latin), from the task's training split."""
    return [(format_prompt(ex, template), r1_completion(ex, words=words))
            for ex in task.train(n, seed=seed)]
