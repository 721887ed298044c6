"""Final-answer extraction and equivalence checking: the ``accuracy`` reward.

``extract_answer`` takes the model's final answer; ``normalize_answer`` rewrites an answer into a
canonical string (LaTeX wrappers, units, separators and prose removed); ``answers_match`` compares
numbers exactly (``fractions.Fraction``: 0.5 == .5 == 1/2 == \\frac{1}{2}, but 0.333 != 1/3),
tuples element-wise, other strings after normalization, and finally asks math-verify for symbolic
equivalence when it is installed (``pip install math-verify``; optional, imported lazily).
math-verify bounds its time with ``signal.alarm``, which works only in the main thread; called
from another thread it raises, which is logged once and counts as "no match".
"""

from __future__ import annotations

import functools
import logging
import re
from fractions import Fraction

from grpo_jax.rewards import register_reward

log = logging.getLogger(__name__)

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_GSM8K = re.compile(r"####\s*([^\n]*)")
_DECIMAL = r"(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d{1,3})?"  # bounded exponent: no 1e999999999
_NUMBER = re.compile(rf"[+-]?{_DECIMAL}")
_PROSE_NUMBER = re.compile(r"(?<![\w.])[+-]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:/\d+)?")
_THOUSANDS = re.compile(r"(?<![\d,.])\d{1,3}(?:,\d{3})+(?![\d,])")
_TEXT_WRAPPER = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_REL_TOL = 1e-6  # decimal literals are approximations: accept a relative error this small


def extract_answer(text: str) -> str | None:
    """The final answer in ``text``: the last ``<answer>...</answer>`` block (or the ``\\boxed``
    inside it), else the last ``\\boxed{...}``, else GSM8K's ``#### 42``; None if there is none."""
    if not text:
        return None
    tags = _ANSWER_TAG.findall(text)
    if tags:
        inner = tags[-1]
        boxed = _last_boxed(inner)
        answer = boxed if boxed is not None else inner
    else:
        answer = _last_boxed(text)
        if answer is None:
            hashes = _GSM8K.findall(text)
            answer = hashes[-1] if hashes else None
    answer = answer.strip() if answer is not None else None
    return answer or None


def _last_boxed(text: str) -> str | None:
    for m in reversed(list(_BOXED.finditer(text))):
        k = m.end()
        while k < len(text) and text[k] == " ":
            k += 1
        if k < len(text) and text[k] == "{":
            arg, end = _braced(text, k)
            if arg is not None:  # an unbalanced (truncated) box is skipped
                return arg
        elif k > m.end():  # "\boxed 5": the token after the space
            token = re.match(r"[^\s$]+", text[k:])
            if token:
                return token.group(0)
    return None


def _braced(s: str, k: int) -> tuple[str | None, int]:
    """Contents of the balanced ``{...}`` opening at ``s[k]``, and the index after it."""
    depth = 0
    for i in range(k, len(s)):
        depth += {"{": 1, "}": -1}.get(s[i], 0)
        if depth == 0:
            return s[k + 1 : i], i + 1
    return None, len(s)


def _latex_arg(s: str, k: int) -> tuple[str | None, int]:
    while k < len(s) and s[k] == " ":
        k += 1
    if k < len(s) and s[k] == "{":
        return _braced(s, k)
    if k < len(s) and s[k].isalnum():  # \frac12
        return s[k], k + 1
    return None, k


def _frac_to_slash(s: str) -> str:
    """``\\frac{a}{b}`` -> ``a/b`` (parenthesized unless simple), nested fractions included."""
    out, i = [], 0
    while (j := s.find("\\frac", i)) >= 0:
        out.append(s[i:j])
        num, k = _latex_arg(s, j + 5)
        den, k = _latex_arg(s, k) if num is not None else (None, k)
        if num is None or den is None:
            out.append("\\frac")
            i = j + 5
            continue
        if out[-1][-1:].isdigit():  # mixed number 1\frac{1}{2} = 1 + 1/2
            out.append("+")
        out.append(f"{_wrap(_frac_to_slash(num))}/{_wrap(_frac_to_slash(den))}")
        i = k
    out.append(s[i:])
    return "".join(out)


def _wrap(x: str) -> str:
    x = x.strip()
    return x if re.fullmatch(r"[+-]?[\w.]+", x) else f"({x})"


def normalize_answer(s: object) -> str:
    """Canonical form of an answer: lower case, no spaces, LaTeX/units/prose removed."""
    s = str(s).strip()
    s = s.replace("\u2212", "-").replace("\u2013", "-").replace("\u00a0", " ")
    s = re.sub(r"\*\*(.+?)\*\*", r"\1", s)  # markdown bold
    for _ in range(3):  # nested \text{\textbf{..}}
        s = _TEXT_WRAPPER.sub(r" \1 ", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\displaystyle", "")
    s = re.sub(r"\\[()\[\]]", "", s)
    s = re.sub(r"\\(?:left|right)(?![a-zA-Z])", "", s)
    s = re.sub(r"\\[,;:! ]", "", s).replace("~", " ").replace("{,}", ",")
    s = re.sub(r"\^\s*\{?\\circ\}?|°|\\%|%", "", s)
    s = re.sub(r"\\(?:times|cdot)(?![a-zA-Z])", "*", s)
    s = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", s)
    s = _frac_to_slash(s)
    s = re.sub(r"^\s*(?:so\s+)?(?:the\s+)?(?:final\s+)?answer\s*(?:is|:)\s*", "", s, flags=re.I)
    s = s.strip().rstrip(".").strip()
    if m := re.fullmatch(r"[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*([^=]+)", s):  # x = 5
        s = m.group(1).strip()
    if not s.startswith(("(", "[", "{")):
        s = _THOUSANDS.sub(lambda m: m.group(0).replace(",", ""), s)
    s = re.sub(r"(?<![\d.])(\d+)\s+(\d+/\d+)(?![\d/])", r"\1+\2", s)  # "1 1/2"
    s = _number_from_prose(s)
    return re.sub(r"\s+", "", s).lower()


def _number_from_prose(s: str) -> str:
    """``42 apples`` / ``5 cm`` / ``we get 42`` -> the one number, if the rest is only words."""
    if not re.search(r"[a-zA-Z]", s) or re.search(r"[=^\\*+{}]", s):
        return s
    nums = _PROSE_NUMBER.findall(s)
    if len(nums) != 1:
        return s
    rest = _PROSE_NUMBER.sub(" ", s)
    if not re.fullmatch(r"[a-zA-Z\s.,:;!?'\"()]*", rest):
        return s
    spaced = re.search(re.escape(nums[0]) + r"\s", s + " ") is not None
    return nums[0] if re.search(r"[a-zA-Z]{2,}", rest) or spaced else s


def _to_number(s: str) -> tuple[Fraction, bool] | None:
    """A normalized string as an exact number and whether it was written as a decimal."""
    if s.startswith("(") and s.endswith(")") or s.startswith("{") and s.endswith("}"):
        s = s[1:-1]
    if _NUMBER.fullmatch(s):
        return Fraction(s), bool(re.search(r"[.e]", s))
    if m := re.fullmatch(rf"({_NUMBER.pattern})\*10\^\{{?([+-]?\d{{1,3}})\}}?", s):
        return Fraction(m.group(1)) * Fraction(10) ** int(m.group(2)), True
    if m := re.fullmatch(r"(\d{1,4})\^\{?(\d{1,3})\}?", s):
        return Fraction(int(m.group(1)) ** int(m.group(2))), False
    if m := re.fullmatch(r"([+-]?)(\d+)\+(\d+)/(\d+)", s):  # mixed number
        sign = -1 if m.group(1) == "-" else 1
        if int(m.group(4)) != 0:
            return sign * (int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))), False
    if m := re.fullmatch(rf"([+-]?)\(?({_NUMBER.pattern})\)?/\(?({_NUMBER.pattern})\)?", s):
        num, den = Fraction(m.group(2)), Fraction(m.group(3))
        if den != 0:
            value = -num / den if m.group(1) == "-" else num / den
            return value, bool(re.search(r"[.e]", m.group(2) + m.group(3)))
    return None


def _numbers_equal(a: tuple[Fraction, bool], b: tuple[Fraction, bool]) -> bool:
    (x, x_approx), (y, y_approx) = a, b
    if x == y:
        return True
    return (x_approx or y_approx) and abs(x - y) <= _REL_TOL * max(abs(x), abs(y))


def _split_tuple(s: str) -> list[str] | None:
    if len(s) < 2 or s[0] + s[-1] not in ("()", "[]", "{}", "(]", "[)"):
        return None
    parts, depth, cur = [], 0, ""
    for ch in s[1:-1]:
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    return parts + [cur] if parts else None


def _match_normalized(p: str, g: str) -> bool | None:
    """True/False when decided without symbolic algebra, None when unknown."""
    pn, gn = _to_number(p), _to_number(g)
    if pn is not None and gn is not None:
        return _numbers_equal(pn, gn)
    pt, gt = _split_tuple(p), _split_tuple(g)
    if pt is not None and gt is not None and p[0] + p[-1] == g[0] + g[-1]:
        if len(pt) != len(gt):
            return False
        verdicts = [a == b or _match_normalized(a, b) for a, b in zip(pt, gt)]
        return False if False in verdicts else (True if all(verdicts) else None)
    return None


_math_verify_module = None
_warned: set[str] = set()


def _load_math_verify():
    """math_verify, or None when it is not installed (then only our own rules apply)."""
    global _math_verify_module
    if _math_verify_module is None:
        try:
            import math_verify

            _math_verify_module = math_verify
        except ImportError:
            _math_verify_module = False
    return _math_verify_module or None


@functools.lru_cache(maxsize=8192)
def _mv_parse(mv, s: str):
    return mv.parse(s if "$" in s or "\\boxed" in s else f"${s}$")


@functools.lru_cache(maxsize=8192)  # a group's completions often repeat answers; sympy is slow
def _symbolic_match(pred: str, gold: str) -> bool:
    mv = _load_math_verify()
    if mv is None:
        return False
    try:  # math-verify bounds its own time (signal.alarm; main thread only, else it raises)
        return bool(mv.verify(_mv_parse(mv, gold), _mv_parse(mv, pred)))
    except Exception as exc:  # noqa: BLE001 - logged once per kind, then the answer is "no match"
        kind = type(exc).__name__
        if kind not in _warned:
            _warned.add(kind)
            log.warning("math-verify failed (%s: %s); treating as no match", kind, exc)
        return False


def answers_match(pred: object, gold: object, *, symbolic: bool = True) -> bool:
    """Whether answer ``pred`` is equivalent to reference ``gold`` (see module docstring)."""
    if pred is None or gold is None:
        return False
    p, g = normalize_answer(pred), normalize_answer(gold)
    if not p or not g:
        return False
    if p == g:
        return True
    verdict = _match_normalized(p, g)
    if verdict is not None:
        return verdict
    return symbolic and _symbolic_match(str(pred), str(gold))


@register_reward("accuracy")
def accuracy_reward(prompts: list[str], completions: list[str], *, answer: list, **fields) -> list[float]:
    """1.0 if the completion's final answer matches ``answer`` (a GSM8K ``#### 42`` or MATH
    ``\\boxed{}`` solution as reference is reduced to its final answer first), else 0.0."""
    scores = []
    for completion, ref in zip(completions, answer, strict=True):
        ref = str(ref)
        if "####" in ref or _BOXED.search(ref):
            ref = extract_answer(ref) or ref
        scores.append(1.0 if answers_match(extract_answer(completion), ref) else 0.0)
    return scores
