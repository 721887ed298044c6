"""Countdown reward (TinyZero): reach ``target`` with an arithmetic expression that uses each of
``nums`` exactly once.

    r = 0    no <answer>...</answer> block
    r = 0.1  an answer that is malformed, uses the numbers wrongly, divides by zero, or misses
    r = 1    a well-formed expression over exactly the given multiset of numbers equal to target

As in TinyZero the last answer block is scored and it must be the bare expression (``(6+4)*2``,
not ``(6+4)*2 = 20``). The expression is parsed by a small recursive-descent parser over
``fractions.Fraction`` (numbers, + - * /, parentheses, unary minus), never ``eval``-ed: model
output is untrusted text, and exact arithmetic makes 1/3*3 == 1 without a tolerance.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Sequence

from grpo_jax.rewards import register_reward

FORMAT_SCORE = 0.1
MAX_EXPR_CHARS = 512  # longer "expressions" are not an answer to a 3-4 number puzzle
MAX_DEPTH = 64  # parenthesis/unary nesting; bounds the parser's recursion
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_TOKEN = re.compile(r"\s*(?:(\d+(?:\.\d+)?)|(.))")
_SYNONYMS = str.maketrans({"\u00d7": "*", "\u00f7": "/", "\u2212": "-", "\u2013": "-"})


class _Parser:
    """expr := term (('+'|'-') term)* ; term := unary (('*'|'/') unary)* ;
    unary := ('-'|'+') unary | primary ; primary := NUMBER | '(' expr ')'"""

    def __init__(self, text: str):
        self.tokens: list[str | Fraction] = []
        for m in _TOKEN.finditer(text.translate(_SYNONYMS).strip()):
            number, op = m.groups()
            if number is not None:
                self.tokens.append(Fraction(number))
            elif op not in "+-*/()":
                raise ValueError(f"unexpected character {op!r}")
            else:
                self.tokens.append(op)
        self.pos = 0
        self.depth = 0
        self.numbers: list[Fraction] = []

    def peek(self) -> str | Fraction | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str | Fraction | None:
        tok = self.peek()
        self.pos += 1
        return tok

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-"):
            value = value + self.term() if self.take() == "+" else value - self.term()
        return value

    def term(self) -> Fraction:
        value = self.unary()
        while self.peek() in ("*", "/"):
            if self.take() == "*":
                value = value * self.unary()
            else:
                divisor = self.unary()
                if divisor == 0:
                    raise ZeroDivisionError("division by zero")
                value = value / divisor
        return value

    def unary(self) -> Fraction:
        if self.peek() in ("-", "+"):
            sign = self.take()
            self._enter()
            value = self.unary()
            self.depth -= 1
            return -value if sign == "-" else value
        return self.primary()

    def primary(self) -> Fraction:
        tok = self.take()
        if isinstance(tok, Fraction):
            self.numbers.append(tok)
            return tok
        if tok == "(":
            self._enter()
            value = self.expr()
            self.depth -= 1
            if self.take() != ")":
                raise ValueError("missing ')'")
            return value
        raise ValueError(f"expected a number or '(', got {tok!r}")

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ValueError(f"nesting deeper than {MAX_DEPTH}")


def evaluate_expression(text: str) -> tuple[Fraction, list[Fraction]]:
    """Exact value of an arithmetic expression and the numbers it uses, in order.

    Raises ValueError if it is malformed (or too long) and ZeroDivisionError on division by 0."""
    if len(text) > MAX_EXPR_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPR_CHARS} characters")
    parser = _Parser(text)
    if not parser.tokens:
        raise ValueError("empty expression")
    value = parser.expr()
    if parser.pos != len(parser.tokens):
        raise ValueError(f"unexpected {parser.peek()!r} after the expression")
    return value, parser.numbers


def countdown_score(completion: str, nums: Sequence[float], target: float) -> float:
    """The TinyZero score of one completion (see module docstring)."""
    answers = _ANSWER.findall(completion)
    if not answers:
        return 0.0
    try:
        value, used = evaluate_expression(answers[-1])
    except (ValueError, ZeroDivisionError):
        return FORMAT_SCORE
    if sorted(used) != sorted(Fraction(n) for n in nums):
        return FORMAT_SCORE
    return 1.0 if value == Fraction(target) else FORMAT_SCORE


@register_reward("countdown")
def countdown_reward(
    prompts: list[str], completions: list[str], *, nums: list[Sequence[float]], target: list[float], **fields
) -> list[float]:
    """Countdown score per completion; fields ``nums`` (numbers per example) and ``target``."""
    return [countdown_score(c, n, t) for c, n, t in zip(completions, nums, target, strict=True)]
