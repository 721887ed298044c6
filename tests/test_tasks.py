"""Tasks: generators, held-out splits, file loaders, prompt templates."""

from __future__ import annotations

import ast
import json
import operator
from fractions import Fraction

import pytest

from grpo_jax.tasks import (
    R1_ZERO_TEMPLATE,
    TASKS,
    Task,
    chat_prompt,
    format_prompt,
    get_task,
    in_eval_split,
    r1_zero_prompt,
    register_task,
)
from grpo_jax.tasks.countdown import countdown_key
from grpo_jax.tasks.files import last_boxed, load_gsm8k, load_math

# ---------------------------------------------------------------- registry


def test_registry_builds_every_builtin_and_rejects_unknown():
    assert {"arithmetic", "countdown", "gsm8k", "math"} <= set(TASKS)
    assert isinstance(get_task("arithmetic"), Task)
    with pytest.raises(ValueError, match=r"unknown task 'countdwn'.*Did you mean 'countdown'"):
        get_task("countdwn")
    with pytest.raises(ValueError, match="already registered"):
        register_task("countdown")(lambda **kw: None)


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match="operators"):
        get_task("arithmetic", operators="+/")
    with pytest.raises(ValueError, match="num_operands"):
        get_task("arithmetic", num_operands=(1, 3))
    with pytest.raises(ValueError, match="eval_fraction"):
        get_task("countdown", eval_fraction=0.0)


# ---------------------------------------------------------------- synthetic tasks

SYNTHETIC = [("arithmetic", {}), ("countdown", {}), ("countdown", {"num_range": (1, 9)})]


@pytest.mark.parametrize("name,kw", SYNTHETIC)
def test_deterministic_per_seed_and_seeds_differ(name, kw):
    task = get_task(name, **kw)
    assert task.train(50, seed=3) == get_task(name, **kw).train(50, seed=3)
    assert task.train(50, seed=3) != task.train(50, seed=4)
    assert task.eval(40) == task.eval(40)
    assert task.eval(40)[:10] == task.eval(10)  # a smaller eval set is a prefix of a larger one
    ex = task.train(1, seed=0)[0]
    assert {"id", "question", "answer"} <= set(ex) and ex["id"].startswith(name)


@pytest.mark.parametrize("name,kw", SYNTHETIC + [("arithmetic", {"digits": (1, 1)})])
def test_eval_and_train_are_disjoint(name, kw):
    task = get_task(name, **kw)
    key = (lambda ex: countdown_key(ex["nums"], ex["target"])) if name == "countdown" else (
        lambda ex: ex["question"]
    )
    ev = {key(ex) for ex in task.eval(200)}
    assert len(ev) == 200  # eval problems are distinct
    train = [key(ex) for seed in range(3) for ex in task.train(1000, seed=seed)]
    assert not ev & set(train)
    assert all(in_eval_split(k, task.eval_fraction) for k in ev)
    assert not any(in_eval_split(k, task.eval_fraction) for k in train)


def test_arithmetic_answers_are_exact():
    task = get_task("arithmetic", digits=(1, 3), num_operands=(2, 4))
    exs = task.train(2000, seed=0) + task.eval(200)
    for ex in exs:
        expr = ex["question"].removeprefix("Compute ").removesuffix(".")
        assert expr == ex["expression"]
        assert int(ex["answer"]) == eval(expr), ex  # fine here: we generated the string
    ops = {c for ex in exs for c in ex["expression"] if c in "+-*()"}
    assert ops == set("+-*()")  # every operator, and precedence-forced parentheses, occur
    assert {len([t for t in ex["expression"] if t in "+-*"]) for ex in exs} >= {1, 2, 3}


def test_arithmetic_respects_operators_and_sign():
    task = get_task("arithmetic", operators="-", allow_negative=False, num_operands=(2, 4))
    exs = task.train(500, seed=1)
    assert all(set(ex["expression"]) <= set("0123456789-()") for ex in exs)
    assert all(int(ex["answer"]) >= 0 for ex in exs)


def test_tiny_problem_space_errors_instead_of_looping():
    task = get_task("arithmetic", digits=(1, 1), operators="+", num_operands=(2, 2))
    with pytest.raises(ValueError, match="found only"):
        task.eval(100)  # only ~100 problems exist and ~10% of them are held out


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv}


def _fraction_eval(node: ast.AST, leaves: list[int]) -> Fraction:
    if isinstance(node, ast.Expression):
        return _fraction_eval(node.body, leaves)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        leaves.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _fraction_eval(node.left, leaves), _fraction_eval(node.right, leaves)
        return _OPS[type(node.op)](left, right)
    raise AssertionError(f"unexpected node {ast.dump(node)}")


@pytest.mark.parametrize("kw", [{}, {"num_range": (1, 9)}, {"count": (4, 4), "max_target": 50}])
def test_countdown_solutions_use_each_number_once_and_hit_target(kw):
    task = get_task("countdown", **kw)
    lo, hi = task.num_range
    exs = task.train(500, seed=0) + task.eval(50)
    for ex in exs:
        leaves: list[int] = []
        value = _fraction_eval(ast.parse(ex["solution"], mode="eval"), leaves)
        assert sorted(leaves) == sorted(ex["nums"]), ex
        assert value == ex["target"] and str(ex["target"]) == ex["answer"], ex
        assert 1 <= ex["target"] <= task.max_target
        assert task.count[0] <= len(ex["nums"]) <= task.count[1]
        assert all(lo <= x <= hi for x in ex["nums"])
        assert ex["question"].startswith(f"Using the numbers {ex['nums']}, create an equation "
                                         f"that equals {ex['target']}.")
    assert any("/" in ex["solution"] for ex in exs)


# ---------------------------------------------------------------- file loaders


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_load_gsm8k_strips_commas(tmp_path):
    p = _jsonl(tmp_path / "gsm.jsonl", [
        {"question": "How many?", "answer": "Add them.\n#### 1,234"},
        "",  # blank lines are skipped
        {"question": "And now?", "answer": "So 5 - 3 = 2\n#### 2"},
    ])
    exs = load_gsm8k(p)
    assert [ex["answer"] for ex in exs] == ["1234", "2"]
    assert exs[0]["question"] == "How many?" and exs[0]["solution"].endswith("#### 1,234")
    assert exs[0]["id"] != exs[1]["id"] and exs[0]["id"] == load_gsm8k(p)[0]["id"]


def test_load_math_boxed_and_answer_field(tmp_path):
    p = _jsonl(tmp_path / "math.jsonl", [
        {"problem": "Half?", "solution": "First \\boxed{3}, no: $\\boxed{\\frac{1}{2}}$.",
         "level": "Level 1"},
        {"problem": "Set?", "solution": "It is $\\boxed{\\{1, 2\\}}$"},
        {"problem": "Given", "solution": "anything", "answer": "\\sqrt{2}"},
        {"problem": "No solution text", "answer": 7},
    ])
    exs = load_math(p)
    assert [ex["answer"] for ex in exs] == ["\\frac{1}{2}", "\\{1, 2\\}", "\\sqrt{2}", "7"]
    assert exs[0]["level"] == "Level 1" and exs[0]["question"] == "Half?"
    assert last_boxed("\\boxed{a{b}c} and \\boxed 5$") == "5"
    assert last_boxed("\\boxed{unbalanced") is None and last_boxed("none") is None


def test_loader_errors_name_file_line_and_field(tmp_path):
    p = _jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "#### 1"},
                                        {"question": "q2", "answer": "#### 2"},
                                        {"question": "q3"}])
    with pytest.raises(ValueError, match=r"bad\.jsonl, line 3: missing field 'answer'"):
        load_gsm8k(p)
    p = _jsonl(tmp_path / "nogold.jsonl", [{"question": "q", "answer": "no marker"}])
    with pytest.raises(ValueError, match=r"nogold\.jsonl, line 1: .*####"):
        load_gsm8k(p)
    p = _jsonl(tmp_path / "m.jsonl", [{"problem": "p", "solution": "\\boxed{1}"},
                                      {"solution": "x"}])
    with pytest.raises(ValueError, match=r"m\.jsonl, line 2: missing field 'problem'"):
        load_math(p)
    p = _jsonl(tmp_path / "nobox.jsonl", [{"problem": "p", "solution": "no box"}])
    with pytest.raises(ValueError, match=r"nobox\.jsonl, line 1: .*boxed"):
        load_math(p)
    p = _jsonl(tmp_path / "json.jsonl", ["{not json"])
    with pytest.raises(ValueError, match=r"json\.jsonl, line 1: invalid JSON"):
        load_gsm8k(p)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: the dataset is empty"):
        load_gsm8k(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match=r"missing\.jsonl: no such file"):
        load_math(tmp_path / "missing.jsonl")
    (tmp_path / "rows.pkl").write_bytes(b"\x80\x04.")
    with pytest.raises(ValueError, match="unsupported file type '.pkl'"):
        load_gsm8k(tmp_path / "rows.pkl")


def test_load_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"question": "q1", "answer": "#### 3,000"}, {"question": "q2", "answer": None}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "g.parquet")
    with pytest.raises(ValueError, match=r"g\.parquet, row 2: missing field 'answer'"):
        load_gsm8k(tmp_path / "g.parquet")
    pq.write_table(pa.Table.from_pylist(rows[:1]), tmp_path / "g.parquet")
    assert load_gsm8k(tmp_path / "g.parquet")[0]["answer"] == "3000"


def test_file_tasks_hash_split_and_eval_path(tmp_path):
    rows = [{"question": f"Q{i}?", "answer": f"#### {i}"} for i in range(300)]
    p = _jsonl(tmp_path / "train.jsonl", rows)
    task = get_task("gsm8k", path=str(p))
    ev = task.eval()
    assert 10 < len(ev) < 60 and task.eval(5) == ev[:5]
    train = task.train(1000, seed=0)  # more than one epoch
    assert not {ex["question"] for ex in ev} & {ex["question"] for ex in train}
    assert len({ex["question"] for ex in train}) == 300 - len(ev)
    assert train == task.train(1000, seed=0) and train != task.train(1000, seed=1)
    with pytest.raises(ValueError, match="only"):
        task.eval(len(ev) + 1)

    e = _jsonl(tmp_path / "test.jsonl", [{"problem": "P", "solution": "\\boxed{4}"}])
    m = _jsonl(tmp_path / "m.jsonl", [{"problem": f"P{i}", "answer": str(i)} for i in range(5)])
    task = get_task("math", path=str(m), eval_path=str(e))
    assert [ex["answer"] for ex in task.eval(1)] == ["4"]
    assert len({ex["question"] for ex in task.train(5, seed=0)}) == 5  # one full epoch


# ---------------------------------------------------------------- templates


def test_r1_zero_prompt_text():
    prompt = r1_zero_prompt("Compute 2+3.")
    assert prompt == R1_ZERO_TEMPLATE.format(prompt="Compute 2+3")
    assert prompt.startswith("A conversation between User and Assistant. The user asks a question")
    assert prompt.endswith(
        "<think> reasoning process here </think> <answer> answer here </answer>. "
        "User: Compute 2+3. Assistant:"
    )
    assert r1_zero_prompt("Why?").endswith("User: Why?. Assistant:")
    assert format_prompt({"question": "Why?"}, "plain") == "Why?"
    with pytest.raises(ValueError, match="unknown template"):
        format_prompt({"question": "Why?"}, "r1")


def _tiny_tokenizer(chat_template):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    model = tokenizers.models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer(model))
    tok.chat_template = chat_template
    return tok


def test_chat_prompt_uses_the_tokenizer_template():
    tok = _tiny_tokenizer(
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    assert chat_prompt(tok, "2+2?") == "<|user|>2+2?\n<|assistant|>"
    assert chat_prompt(tok, "2+2?", system="Be brief.", add_think=True) == (
        "<|system|>Be brief.\n<|user|>2+2?\n<|assistant|><think>\n"
    )
    assert format_prompt({"question": "x"}, "chat", tok) == "<|user|>x\n<|assistant|>"
    from grpo_jax.tasks.templates import R1_SYSTEM_PROMPT

    assert format_prompt({"question": "x"}, "chat_r1", tok) == (
        f"<|system|>{R1_SYSTEM_PROMPT}\n<|user|>x\n<|assistant|>")
    assert "<think> </think> and <answer> </answer> tags" in R1_SYSTEM_PROMPT
    with pytest.raises(ValueError, match="needs a tokenizer"):
        format_prompt({"question": "x"}, "chat")
    with pytest.raises(ValueError, match="has no chat template"):
        chat_prompt(_tiny_tokenizer(None), "2+2?")
