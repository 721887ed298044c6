"""Table-driven tests of grpo_jax.rewards: extraction, equivalence, format, language, countdown,
length shaping, repetition, the registry and the failure policy of score_completions."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from grpo_jax import rewards as R
from grpo_jax.rewards import math_answer
from grpo_jax.rewards.combine import RewardError, score_completions
from grpo_jax.rewards.countdown import evaluate_expression

HAS_MATH_VERIFY = math_answer._load_math_verify() is not None

# ----------------------------------------------------------------------------- extraction

EXTRACT_CASES = [
    ("<think>so</think> <answer>42</answer>", "42"),
    ("<answer>1</answer> wait <answer> 2 </answer>", "2"),
    ("<answer>The answer is \\boxed{5}.</answer>", "5"),
    ("<answer>7</answer> and later \\boxed{8}", "7"),  # the answer block wins
    ("so it is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("\\boxed{1} no, \\boxed{2}", "2"),
    ("\\boxed{\\frac{a}{b^{2}}}", "\\frac{a}{b^{2}}"),
    ("thus \\boxed 5", "5"),
    ("\\fbox{7}", "7"),
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),
    ("#### 1,234\n", "1,234"),
    ("no final answer here", None),
    ("<answer>  </answer>", None),
    ("\\boxed{5", None),  # truncated box
    ("", None),
]


@pytest.mark.parametrize("text, expected", EXTRACT_CASES)
def test_extract_answer(text, expected):
    assert R.extract_answer(text) == expected


# ----------------------------------------------------------------------------- equivalence

MATCH_CASES = [  # (pred, gold, match) decided without symbolic algebra
    ("42", "42", True),
    ("0.5", ".5", True),
    ("1/2", "0.5", True),
    ("\\frac{1}{2}", "0.5", True),
    ("\\dfrac{1}{2}", "1/2", True),
    ("\\tfrac12", "0.5", True),
    ("\\dfrac{3}{4}", ".75", True),
    ("-\\frac{3}{4}", "-0.75", True),
    ("\\frac{-3}{4}", "-3/4", True),
    ("1,234", "1234", True),
    ("1,234,567", "1234567", True),
    ("$42$", "42", True),
    ("\\$42", "42", True),
    ("\\$1,234.50", "1234.5", True),
    ("42%", "42", True),
    ("42\\%", "42", True),
    ("42 apples", "42", True),
    ("5 cm", "5", True),
    ("5\\text{ cm}", "5", True),
    ("30^\\circ", "30", True),
    ("The answer is 42.", "42", True),
    ("Answer: 42", "42", True),
    ("So we get 42 cookies in total.", "42", True),
    ("42.", "42", True),
    ("  42  ", "42", True),
    ("x = 5", "5", True),
    ("x=5", "5", True),
    ("−3", "-3", True),  # unicode minus
    ("+5", "5", True),
    ("3.0", "3", True),
    ("1e-3", "0.001", True),
    ("1.5E3", "1500", True),
    ("1.5 \\times 10^{3}", "1500", True),
    ("2^{10}", "1024", True),
    ("1\\frac{1}{2}", "3/2", True),  # mixed number
    ("1 1/2", "1.5", True),
    ("0.3333333", "\\frac13", True),  # decimal approximation within 1e-6 relative
    ("\\left( 1, 2 \\right)", "(1,2)", True),
    ("(1, 0.5)", "(1, \\frac{1}{2})", True),
    ("\\text{Evelyn}", "Evelyn", True),
    ("**42**", "42", True),
    ("12", "1,2", False),  # 1,2 is no thousands separator
    ("\\frac{1}{3}", "0.333", False),
    ("-3", "3", False),
    ("3", "-3", False),
    ("42", "43", False),
    ("0.5", "0.55", False),
    ("100", "1,000", False),
    ("1234", "123.4", False),
    ("3x", "3", False),  # 3x is not 3 apples
    ("(1,2)", "(2,1)", False),
    ("(1,2)", "(1,2,3)", False),
    ("1/2", "2", False),
    ("1e3", "1e4", False),
    ("2 apples and 3 oranges", "2", False),
    (None, "1", False),
    ("", "1", False),
    ("1", "", False),
]


@pytest.mark.parametrize("pred, gold, match", MATCH_CASES)
def test_answers_match(pred, gold, match):
    assert R.answers_match(pred, gold) is match


@pytest.mark.parametrize("pred, gold, match", MATCH_CASES)
def test_answers_match_without_math_verify(pred, gold, match, monkeypatch):
    monkeypatch.setattr(math_answer, "_math_verify_module", False)  # as if not installed
    assert math_answer._load_math_verify() is None
    assert R.answers_match(pred, gold) is match


SYMBOLIC_CASES = [
    ("\\sqrt{2}/2", "\\frac{\\sqrt{2}}{2}", True),
    ("\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt{2}}{2}", True),
    ("(x+1)^2", "x^2+2x+1", True),
    ("x^2", "x^3", False),
]


@pytest.mark.skipif(not HAS_MATH_VERIFY, reason="math-verify not installed")
@pytest.mark.parametrize("pred, gold, match", SYMBOLIC_CASES)
def test_answers_match_symbolic(pred, gold, match):
    assert R.answers_match(pred, gold) is match
    assert R.answers_match(pred, gold, symbolic=False) is False  # our rules alone do not know


@pytest.mark.parametrize(
    "raw, normalized",
    [("\\left( 1, 2 \\right)", "(1,2)"), ("\\dfrac{3}{4}", "3/4"), ("The answer is 1,234.", "1234"),
     ("\\text{ Yes }", "yes"), ("$\\$5$", "5")],
)
def test_normalize_answer(raw, normalized):
    assert R.normalize_answer(raw) == normalized


def test_accuracy_reward():
    completions = ["<answer>72</answer>", "\\boxed{0.5}", "#### 7", "I don't know", "<answer>3</answer>"]
    answers = ["Natalia ... so 72.\n#### 72", "\\frac{1}{2}", 7, "5", "The sum is \\boxed{-3}"]
    got = R.get_reward("accuracy")([""] * 5, completions, answer=answers, unused_field=[0] * 5)
    assert got == [1.0, 1.0, 1.0, 0.0, 0.0]


# ----------------------------------------------------------------------------- format

GOOD = "<think>reasoning</think><answer>42</answer>"
FORMAT_CASES = [  # (prompt, completion, think_prefilled, strict, partial)
    ("Q", GOOD, None, 1.0, 1.0),
    ("Q", " <think> r\nr </think>\n<answer> 42 </answer> \n", None, 1.0, 1.0),
    ("Q", "<think></think><answer>42</answer>", None, 0.0, 1.0),
    ("Q", "<think>  </think><answer>42</answer>", None, 0.0, 1.0),
    ("Q", "<think>r</think><answer> </answer>", None, 0.0, 1.0),
    ("Q", GOOD + " trailing words", None, 0.0, 1.0),
    ("Q", "preamble " + GOOD, None, 0.0, 1.0),
    ("Q", "<answer>42</answer><think>r</think>", None, 0.0, 1.0),
    ("Q", "<think>r</think><think>r</think><answer>42</answer>", None, 0.0, 0.5),
    ("Q", "<think>a<think>b</think><answer>c</answer>", None, 0.0, 0.75),
    ("Q", "<think>r</think>", None, 0.0, 0.5),
    ("Q", "<answer>42</answer>", None, 0.0, 0.5),
    ("Q", "just text", None, 0.0, 0.0),
    ("Q", "", None, 0.0, 0.0),
    ("Q. Assistant: <think>", "r</think><answer>42</answer>", None, 1.0, 1.0),  # detected
    ("Q. Assistant: <think>\n", "r</think><answer>42</answer>", None, 1.0, 1.0),
    ("Q. Assistant: <think>", GOOD, None, 0.0, 0.75),  # opened twice
    ("Q", "r</think><answer>42</answer>", None, 0.0, 0.75),
    ("Q", "r</think><answer>42</answer>", True, 1.0, 1.0),  # explicit field
    ("Q. Assistant: <think>", GOOD, False, 1.0, 1.0),  # explicit beats detection
]


@pytest.mark.parametrize("prompt, completion, prefilled, strict, partial", FORMAT_CASES)
def test_format_rewards(prompt, completion, prefilled, strict, partial):
    kw = {} if prefilled is None else {"think_prefilled": [prefilled]}
    assert R.get_reward("format")([prompt], [completion], **kw) == [strict]
    assert R.get_reward("format_partial")([prompt], [completion], **kw) == [partial]


def test_format_prefilled_as_bool_and_bad_length():
    assert R.format_reward(["Q", "Q"], ["r</think><answer>1</answer>"] * 2, think_prefilled=True) == [1.0, 1.0]
    with pytest.raises(ValueError, match="think_prefilled"):
        R.format_reward(["Q", "Q"], [GOOD, GOOD], think_prefilled=[True])


# ----------------------------------------------------------------------------- language

SCRIPT_CASES = [("a", "latin"), ("Z", "latin"), ("é", "latin"), ("Ａ", "latin"), ("中", "cjk"),
                ("あ", "cjk"), ("ア", "cjk"), ("ー", "cjk"), ("한", "cjk"), ("ж", "cyrillic"),
                ("ب", "arabic"), ("न", "devanagari"), ("λ", "greek"), ("א", "other"),
                ("1", None), (" ", None), ("!", None), ("。", None), ("\u094d", None)]


@pytest.mark.parametrize("char, script", SCRIPT_CASES)
def test_script_of(char, script):
    assert R.script_of(char) == script


LANGUAGE_CASES = [  # (completion, target, share)
    ("<think>Hello world</think><answer>5</answer>", "latin", 1.0),
    ("<think>你好世界</think><answer>5</answer>", "cjk", 1.0),
    ("<think>你好world</think>", "latin", 5 / 7),
    ("<think>你好world</think>", "cjk", 2 / 7),
    ("<think>你好world</think>", "zh", 2 / 7),
    ("<think>123 + 456 = 579!</think>", "latin", 1.0),  # no letters
    ("<think>abc</think><answer>中文中文</answer>", "latin", 1.0),  # only the reasoning counts
    ("no think block 中文", "latin", 12 / 14),
    ("reasoning 中文</think><answer>x</answer>", "latin", 9 / 11),  # <think> pre-filled
    ("<think>unclosed 中", "latin", 8 / 9),
    ("<think>Привет hi</think>", "cyrillic", 6 / 8),
    ("<think>こんにちはカタカナ한국어</think>", "cjk", 1.0),
    ("<think>αβγ abc</think>", "greek", 0.5),
    ("<think>مرحبا</think>", "arabic", 1.0),
    ("<think>नमस्ते दुनिया</think>", "devanagari", 1.0),  # vowel signs are marks, not letters
]


@pytest.mark.parametrize("completion, target, share", LANGUAGE_CASES)
def test_language_reward(completion, target, share):
    got = R.get_reward("language")(["Q"], [completion], language=[target])
    assert got == [pytest.approx(share, abs=1e-12)]


def test_language_defaults_and_errors():
    assert R.language_reward(["Q"], ["<think>abc 中</think>"]) == [pytest.approx(0.75)]
    assert R.language_share("", "latin") == 1.0
    with pytest.raises(ValueError, match="unknown script"):
        R.language_share("abc", "klingon")


# ----------------------------------------------------------------------------- countdown

NUMS, TARGET = [3, 5, 7], 22
COUNTDOWN_CASES = [
    ("<think>try</think><answer>3*5+7</answer>", 1.0),
    ("<answer>7+5*3</answer>", 1.0),
    ("<answer> (3 * 5) + 7 </answer>", 1.0),
    ("<answer>3×5+7</answer>", 1.0),
    ("no answer tags: 3*5+7", 0.0),
    ("<answer>3*5+7", 0.0),  # never closed
    ("<answer>3+5+7</answer>", 0.1),  # wrong value
    ("<answer>3*5+6+1</answer>", 0.1),  # number not given
    ("<answer>3*5+7+3-3</answer>", 0.1),  # reuse
    ("<answer>3*5</answer>", 0.1),  # missing number
    ("<answer>3*5+7 = 22</answer>", 0.1),  # not a bare expression
    ("<answer>3*5+7</answer> no: <answer>3+5+7</answer>", 0.1),  # last block counts
    ("<answer></answer>", 0.1),
    ("<answer>(3*5+7</answer>", 0.1),
    ("<answer>3*(5+7))</answer>", 0.1),
    ("<answer>3 5 7</answer>", 0.1),
    ("<answer>3**5+7</answer>", 0.1),
    ("<answer>" + "(" * 200 + "3*5+7" + ")" * 200 + "</answer>", 0.1),  # too deep, no crash
    ("<answer>" + "9" * 2000 + "</answer>", 0.1),  # too long
]


@pytest.mark.parametrize("completion, score", COUNTDOWN_CASES)
def test_countdown(completion, score):
    assert R.get_reward("countdown")(["Q"], [completion], nums=[NUMS], target=[TARGET]) == [score]


@pytest.mark.parametrize(
    "expr, nums, target, score",
    [("5+4/0", [4, 0, 5], 5, 0.1), ("5+0/4", [4, 0, 5], 5, 1.0), ("3/(1/3)", [1, 3, 3], 9, 1.0),
     ("-5+2", [2, 5], -3, 1.0), ("(8-2)*(6/3)", [8, 2, 6, 3], 12, 1.0), ("1/3*3", [1, 3, 3], 1, 1.0), ("1/3*3", [1, 3], 1, 0.1)],
)
def test_countdown_arithmetic(expr, nums, target, score):
    assert R.countdown_reward(["Q"], [f"<answer>{expr}</answer>"], nums=[nums], target=[target]) == [score]


def test_countdown_never_executes_model_output(tmp_path):
    sentinel = tmp_path / "pwned"
    payloads = [f"__import__('os').system('touch {sentinel}')",
                f"open('{sentinel}', 'w').write('x')", "[c for c in ().__class__.__base__.__subclasses__()]"]
    for payload in payloads:
        assert R.countdown_reward(["Q"], [f"<answer>{payload}</answer>"], nums=[NUMS], target=[TARGET]) == [0.1]
    assert not sentinel.exists()
    with pytest.raises(ValueError, match="unexpected character"):
        evaluate_expression("__import__('os')")
    assert evaluate_expression("2*(3+4)-1") == (13, [2, 3, 4, 1])


# ----------------------------------------------------------------------------- length, repetition

@pytest.mark.parametrize(
    "length, max_len, cache_len, penalty",
    [(0, 100, 20, 0.0), (80, 100, 20, 0.0), (81, 100, 20, -0.05), (90, 100, 20, -0.5),
     (100, 100, 20, -1.0), (101, 100, 20, -1.0), (5000, 100, 20, -1.0), (100, 100, 0, 0.0),
     (101, 100, 0, -1.0), (1, 100, 100, -0.01)],
)
def test_overlong_penalty(length, max_len, cache_len, penalty):
    assert R.overlong_penalty(length, max_len, cache_len) == pytest.approx(penalty, abs=1e-12)
    assert R.make_overlong_reward(max_len, cache_len)([""], [""], completion_length=[length]) == [
        pytest.approx(penalty, abs=1e-12)]


def test_overlong_registered_default_and_validation():
    assert R.get_reward("overlong")(["", ""], ["", ""], completion_length=[10, 2000]) == [0.0, -1.0]
    with pytest.raises(ValueError, match="cache_len"):
        R.make_overlong_reward(max_len=10, cache_len=20)


@pytest.mark.parametrize(
    "length, correct, params, value",
    [(0, True, {}, 1.0), (1000, True, {}, 0.5), (500, True, {}, 0.75), (0, False, {}, -1.0),
     (1000, False, {}, -0.5), (500, False, {}, -0.75), (2000, True, {}, 0.5),
     (1000, True, {"exceed": -10.0}, -10.0), (999, True, {"exceed": -10.0}, 0.5 + 0.25 * (1 + math.cos(math.pi * 0.999))),
     (0, True, {"correct_short": 2.0, "correct_long": 1.0}, 2.0),
     (0, False, {"wrong_short": -10.0, "wrong_long": 0.0}, -10.0)],
)
def test_cosine_length_reward(length, correct, params, value):
    assert R.cosine_length_reward(length, correct, 1000, **params) == pytest.approx(value, abs=1e-12)


def test_cosine_reward_reads_correctness_and_length():
    fn = R.make_cosine_reward(max_len=100)
    got = fn(["", ""], ["<answer>4</answer>", "<answer>5</answer>"], completion_length=[0, 100], answer=["4", "4"])
    assert got == [pytest.approx(1.0), pytest.approx(-0.5)]  # short correct; long wrong


@pytest.mark.parametrize(
    "text, n, max_penalty, value",
    [("the cat sat on the mat", 3, 1.0, 0.0), ("a b c a b c a b c", 3, 1.0, -4 / 7),
     ("a b c a b c a b c", 3, 0.5, -2 / 7), ("A a A a", 1, 1.0, -0.75), ("too short", 3, 1.0, 0.0),
     ("", 3, 1.0, 0.0), ("go go go go go", 2, 1.0, -0.75)],
)
def test_repetition_penalty(text, n, max_penalty, value):
    assert R.repetition_penalty(text, n, max_penalty) == pytest.approx(value, abs=1e-12)
    assert R.make_repetition_reward(n, max_penalty)([""], [text]) == [pytest.approx(value, abs=1e-12)]


# ----------------------------------------------------------------------------- registry

def test_registry_names_and_suggestion():
    assert {"accuracy", "format", "format_partial", "language", "countdown", "overlong", "cosine",
            "repetition"} <= set(R.REWARDS)
    with pytest.raises(ValueError, match=r"unknown reward 'acuracy'.*Did you mean 'accuracy'\?"):
        R.get_reward("acuracy")


@pytest.fixture
def temp_rewards():
    """Registers test-only rewards and removes them afterwards."""
    added = []

    def add(name, fn):
        R.register_reward(name)(fn)
        added.append(name)
        return fn

    yield add
    for name in added:
        R.REWARDS.pop(name, None)


def test_register_duplicate_rejected(temp_rewards):
    temp_rewards("_t_dup", lambda p, c, **f: [0.0] * len(c))
    with pytest.raises(ValueError, match="already registered"):
        R.register_reward("_t_dup")(lambda p, c, **f: [1.0] * len(c))
    with pytest.raises(ValueError, match="already registered"):
        R.register_reward("format")(_raises_on_bad)
    R.register_reward("format")(R.format_reward)  # the same function again (a module reload) is fine
    R.register_reward("_t_dup", overwrite=True)(lambda p, c, **f: [1.0] * len(c))
    assert R.get_reward("_t_dup")([""], [""]) == [1.0]


@pytest.mark.parametrize("name", ["accuracy", "format", "format_partial", "language", "countdown",
                                  "overlong", "cosine", "repetition"])
def test_every_registered_reward_ignores_unknown_fields(name):
    fields = dict(answer=["3"], nums=[[1, 2]], target=[3], completion_length=[5], language=["en"],
                  some_unknown_field=["x"])
    out = R.get_reward(name)(["Q"], ["<think>1+2</think><answer>1+2</answer>"], **fields)
    assert len(out) == 1 and isinstance(out[0], float)


# ----------------------------------------------------------------------------- combine

def _raises_on_bad(prompts, completions, **fields):
    return [1 / 0 if "BAD" in c else 1.0 for c in completions]


def _nan_on_bad(prompts, completions, **fields):
    return [float("nan") if "BAD" in c else 0.5 for c in completions]


def test_score_completions_weights():
    comps = ["<think>ok</think><answer>4</answer>", "<think>好</think><answer>5</answer>", "4"]
    res = score_completions(["Q"] * 3, comps, {"answer": ["4", "4", "4"]},
                            {"accuracy": 1.0, "format": 0.3, "language": 0.2})
    np.testing.assert_allclose(res.per_reward["accuracy"], [1, 0, 0])
    np.testing.assert_allclose(res.per_reward["format"], [1, 1, 0])
    np.testing.assert_allclose(res.per_reward["language"], [1, 0, 1])
    np.testing.assert_allclose(res.total, [1.5, 0.3, 0.2])
    assert res.failures == {"accuracy": 0, "format": 0, "language": 0}


def test_zero_policy_isolates_raising_and_nan(temp_rewards, caplog):
    temp_rewards("_t_raise", _raises_on_bad)
    temp_rewards("_t_nan", _nan_on_bad)
    comps = ["fine", "BAD one", "fine too"]
    with caplog.at_level(logging.WARNING, logger="grpo_jax.rewards.combine"):
        res = score_completions(["Q"] * 3, comps, {}, {"_t_raise": 1.0, "_t_nan": 2.0}, on_error="zero")
    np.testing.assert_array_equal(res.per_reward["_t_raise"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(res.per_reward["_t_nan"], [0.5, 0.0, 0.5])
    np.testing.assert_array_equal(res.total, [2.0, 0.0, 2.0])
    assert res.failures == {"_t_raise": 1, "_t_nan": 1}
    logged = caplog.text
    assert "'_t_raise'" in logged and "ZeroDivisionError" in logged and "BAD one" in logged
    assert "'_t_nan'" in logged and "nan" in logged


@pytest.mark.parametrize(
    "fn, problem",
    [(_raises_on_bad, "ZeroDivisionError"), (_nan_on_bad, "non-finite value nan"),
     (lambda p, c, **f: [float("inf") if "BAD" in x else 0.0 for x in c], "non-finite value inf"),
     (lambda p, c, **f: ["0.5" if "BAD" in x else 0.0 for x in c], "TypeError")],
)
def test_raise_policy_names_reward_problem_and_completion(fn, problem, temp_rewards):
    temp_rewards("_t_bad", fn)
    long_bad = "BAD " + "x" * 1000
    with pytest.raises(RewardError) as info:
        score_completions(["Q"] * 2, ["fine", long_bad], {}, {"_t_bad": 1.0}, on_error="raise")
    msg = str(info.value)
    assert "'_t_bad'" in msg and problem in msg and "BAD xxx" in msg
    assert "[truncated]" in msg and "x" * 400 not in msg


def test_wrong_length_and_batch_only_failures(temp_rewards, caplog):
    temp_rewards("_t_empty", lambda p, c, **f: [])
    temp_rewards("_t_batch", lambda p, c, **f: [1.0] if len(c) == 1 else 1 / 0)
    with caplog.at_level(logging.WARNING, logger="grpo_jax.rewards.combine"):
        res = score_completions(["Q"] * 3, ["a", "b", "c"], {}, {"_t_empty": 1.0, "_t_batch": 1.0})
    assert res.failures == {"_t_empty": 3, "_t_batch": 0}
    np.testing.assert_array_equal(res.total, [1.0, 1.0, 1.0])
    assert "on no single example" in caplog.text
    assert "scored 0 for 3 of 3 completions (and 2 more in this batch)" in caplog.text
    assert len([r for r in caplog.records if "_t_empty" in r.getMessage()]) == 1  # one line per call
    with pytest.raises(RewardError, match="on no single example"):
        score_completions(["Q"] * 3, ["a", "b", "c"], {}, {"_t_batch": 1.0}, on_error="raise")


def test_score_completions_validates_inputs():
    with pytest.raises(ValueError, match="field 'answer' has 1 values for 2"):
        score_completions(["Q", "Q"], ["a", "b"], {"answer": ["1"]}, {"accuracy": 1.0})
    with pytest.raises(ValueError, match="Did you mean 'format'"):
        score_completions(["Q"], ["a"], {}, {"fromat": 1.0})
    with pytest.raises(ValueError, match="on_error"):
        score_completions(["Q"], ["a"], {}, {"format": 1.0}, on_error="ignore")
