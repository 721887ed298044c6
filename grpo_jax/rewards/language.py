"""Language-consistency reward (DeepSeek-R1 stage 2): the share of the chain of thought written in
the target script, which penalizes language mixing.

    r_lang = (# letters in the target script) / (# letters)     (1.0 when there are no letters)

Only letters count (Unicode category L*): digits, punctuation, symbols, combining marks and
whitespace are ignored, so formulas and numbers do not dilute the share. The text scored is the
inside of ``<think>...</think>`` (the text before ``</think>`` when the prompt pre-filled
``<think>``; everything after an unclosed ``<think>``), or the whole completion without one.
The script of a letter comes from its Unicode name, which is what ``unicodedata`` exposes.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Sequence

from grpo_jax.rewards import register_reward

SCRIPTS = ("latin", "cjk", "cyrillic", "arabic", "devanagari", "greek")
# First word(s) of Unicode character names -> script. Japanese kana and Hangul count as "cjk" so
# that Chinese, Japanese and Korean text is one target.
_NAME_PREFIXES = {
    "LATIN": "latin",
    "CJK": "cjk",
    "HIRAGANA": "cjk",
    "KATAKANA": "cjk",
    "HANGUL": "cjk",
    "IDEOGRAPHIC": "cjk",
    "CYRILLIC": "cyrillic",
    "ARABIC": "arabic",
    "DEVANAGARI": "devanagari",
    "GREEK": "greek",
}
_ALIASES = {
    "en": "latin", "english": "latin", "fr": "latin", "de": "latin", "es": "latin",
    "zh": "cjk", "chinese": "cjk", "ja": "cjk", "japanese": "cjk", "ko": "cjk", "korean": "cjk",
    "ru": "cyrillic", "russian": "cyrillic", "ar": "arabic", "hi": "devanagari", "el": "greek",
}  # fmt: skip
_THINK = re.compile(r"<think>(.*?)(?:</think>|$)", re.DOTALL)


@functools.lru_cache(maxsize=65536)
def script_of(char: str) -> str | None:
    """The script of a letter (one of SCRIPTS, or "other"); None for a non-letter."""
    if not unicodedata.category(char).startswith("L"):
        return None
    words = unicodedata.name(char, "").replace("-", " ").split()
    for word in words[:2]:  # "FULLWIDTH LATIN ...", "KATAKANA-HIRAGANA PROLONGED ..."
        if word in _NAME_PREFIXES:
            return _NAME_PREFIXES[word]
    return "other"


def canonical_script(script: str) -> str:
    """A script name or language alias ("en", "zh", ...) as one of SCRIPTS."""
    s = _ALIASES.get(script.lower(), script.lower())
    if s not in SCRIPTS:
        raise ValueError(f"unknown script {script!r}; expected one of {SCRIPTS} or {sorted(_ALIASES)}")
    return s


def language_share(text: str, script: str = "latin") -> float:
    """Share of the letters of ``text`` written in ``script``; 1.0 when there are no letters."""
    target = canonical_script(script)
    n_letters = n_target = 0
    for ch in text:
        s = script_of(ch)
        if s is not None:
            n_letters += 1
            n_target += s == target
    return n_target / n_letters if n_letters else 1.0


def reasoning_text(completion: str) -> str:
    """The chain of thought: inside <think>...</think>, else before a lone </think>, else all."""
    if m := _THINK.search(completion):
        return m.group(1)
    if "</think>" in completion:  # <think> pre-filled by the prompt
        return completion.split("</think>", 1)[0]
    return completion


@register_reward("language")
def language_reward(
    prompts: list[str], completions: list[str], *, language: Sequence[str] | None = None, **fields
) -> list[float]:
    """Share of the reasoning's letters in the target script (field ``language``, default latin)."""
    targets = ["latin"] * len(completions) if language is None else list(language)
    return [language_share(reasoning_text(c), t) for c, t in zip(completions, targets, strict=True)]
