"""Evaluation: pass@k and majority vote against hand-computed values, evaluate_policy end to end
through the real sampler on a model whose completions are known, and the `eval` command."""

import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import evaluation as E
from grpo_jax import model as M
from grpo_jax.config import ModelConfig
from grpo_jax.tasks.tokenizers import char_tokenizer

CHAIN_CFG = ModelConfig(arch="qwen2", vocab_size=96, hidden_size=32, intermediate_size=64,
                        num_layers=2, num_heads=2, num_kv_heads=1)
# After the "short" template's final ":", the model writes <think>a</think><answer>D</answer></s>
# with D = 7 or 8, each with probability 1/2: 7 tokens, the stop token included.
CHAIN = {":": ["<think>"], "<think>": ["a"], "a": ["</think>"], "</think>": ["<answer>"],
         "<answer>": ["7", "8"], "7": ["</answer>"], "8": ["</answer>"], "</answer>": ["</s>"]}
EXAMPLES = [{"id": "a", "question": "Compute 3+4.", "answer": "7"},
            {"id": "b", "question": "Compute 4+4.", "answer": "8"},
            {"id": "c", "question": "Compute 4+5.", "answer": "9"},
            {"id": "d", "question": "Compute 14/2.", "answer": "7.0"},
            {"id": "e", "question": "Compute 1+7, that is one plus seven.", "answer": "8"}]


def chain_policy(tok, chain=CHAIN, cfg=CHAIN_CFG, scale=30.0):
    """A model whose next token depends only on the current one. Every layer's output projections
    are 0, so the residual stream stays the token's embedding and logits = rms_norm(embed[x]) @
    lm_head. The tokens of `chain` get basis-vector embeddings (rms_norm(e_j) = sqrt(D) e_j), and
    lm_head row j gives each of their successors the logit `scale`, every other token 0."""
    params = M.init_params(cfg, jax.random.key(0), std=0.5)
    params["layers"]["wo"] = jnp.zeros_like(params["layers"]["wo"])
    params["layers"]["w_down"] = jnp.zeros_like(params["layers"]["w_down"])
    vocab = tok.get_vocab()
    embed = np.array(params["embed"])
    head = np.zeros((cfg.hidden_size, cfg.vocab_size), np.float32)
    for j, (t, successors) in enumerate(chain.items()):
        embed[vocab[t]] = np.eye(cfg.hidden_size)[j]
        for s in successors:
            head[j, vocab[s]] = scale / math.sqrt(cfg.hidden_size)
    return params | {"embed": jnp.asarray(embed), "lm_head": jnp.asarray(head)}


@pytest.fixture(scope="module")
def chain():
    tok = char_tokenizer(tags=True)
    return tok, chain_policy(tok)


# ----------------------------------------------------------------------------- pass@k, vote


def test_pass_at_k_hand_values():
    assert E.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert E.pass_at_k(5, 0, 3) == 0.0
    assert E.pass_at_k(5, 5, 3) == 1.0
    assert E.pass_at_k(5, 4, 2) == 1.0  # n - c < k: every draw of 2 holds a correct one
    assert E.pass_at_k(4, 3, 1) == pytest.approx(3 / 4)  # k = 1: c / n
    assert E.pass_at_k(16, 1, 16) == 1.0
    # A wrong estimator, 1 - (1 - c/n)^k (draws with replacement), would give 0.64 here.
    assert E.pass_at_k(5, 2, 2) != pytest.approx(1 - (1 - 2 / 5) ** 2)


def test_pass_at_k_vectorized_equals_binomials():
    n = 12
    c_P = np.arange(n + 1)
    for k in (1, 3, 7, 12):
        want = [1 - math.comb(n - c, k) / math.comb(n, k) for c in c_P]
        np.testing.assert_allclose(E.pass_at_k(n, c_P, k), want, rtol=1e-12, atol=1e-15)
    # monotone in k for every c
    grid = np.stack([E.pass_at_k(n, c_P, k) for k in range(1, n + 1)])
    assert np.all(np.diff(grid, axis=0) >= -1e-15)


@pytest.mark.parametrize("n,c,k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6), (0, 0, 1)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError, match="pass@k"):
        E.pass_at_k(n, c, k)


def test_majority_vote_groups_equivalent_forms_and_breaks_ties_by_first_seen():
    assert E.majority_vote(["3", "1/2", "0.5", "\\frac{1}{2}", "3"]) == (1, 3)
    assert E.majority_vote(["1/2", "3", "0.5", "3"]) == (0, 2)  # tie: "1/2" came first
    assert E.majority_vote(["3", "1/2", "0.5", "3"]) == (0, 2)  # tie: "3" came first
    assert E.majority_vote([None, "1,000", "7", "1000", None]) == (1, 2)
    assert E.majority_vote(["x = 5", "5", "6"]) == (0, 2)
    assert E.majority_vote([None, None]) == (None, 0)
    assert E.majority_vote(["4", "5", "6"]) == (0, 1)


def test_score_generations_on_chosen_completions():
    ans = lambda a: f"<think>r</think> <answer>{a}</answer>"  # noqa: E731
    examples = [{"id": "p", "question": "q1", "answer": "0.5"},
                {"id": "q", "question": "q2", "answer": "3"}]
    # p: correct, correct (1/2 == 0.5), wrong, unformatted wrong -> c = 2; the vote: {0.5, 1/2}
    # against {2} and {4}: 0.5 wins. q: 2, 2, 3, 3 tie -> "2" was first: cons wrong; c = 2.
    comps = [ans("0.5"), ans("1/2"), ans("2"), "4",
             ans("2"), ans("2"), ans("3"), ans("3")]
    sampled = E.Generations(prompts=["P1", "P2"], completions=comps,
                            lengths_N=np.array([10, 11, 12, 1, 10, 10, 20, 20]),
                            truncated_N=np.array([0, 0, 0, 0, 0, 0, 0, 1], bool), group_size=4)
    greedy = E.Generations(prompts=["P1", "P2"], completions=[ans("\\frac12"), ans("7")],
                           lengths_N=np.array([5, 5]), truncated_N=np.zeros(2, bool), group_size=1)
    r = E.score_generations(examples, sampled, greedy, pass_ks=(1, 2, 4), rows=True)
    assert r["pass_at_1"] == 0.5
    assert r["pass_at_2"] == pytest.approx(1 - 1 / 6)  # both problems: 1 - C(2,2)/C(4,2)
    assert r["pass_at_4"] == 1.0
    assert r["cons_at_k"] == 0.5 and r["greedy_accuracy"] == 0.5
    assert r["format_rate"] == 7 / 8 and r["language_consistency"] == 1.0
    assert r["mean_length"] == 94 / 8 and r["truncated_rate"] == 1 / 8
    assert [row["voted"] for row in r["rows"]] == ["0.5", "2"]
    assert [row["votes"] for row in r["rows"]] == [2, 2]
    assert r["rows"][0]["correct"] == [True, True, False, False]
    assert "reward_failures" not in r


def test_check_pass_ks():
    assert E.check_pass_ks(None, 16) == (1, 16)
    assert E.check_pass_ks([8, 1, 8], 16) == (1, 8)
    with pytest.raises(ValueError, match="pass_ks"):
        E.check_pass_ks([1, 32], 16)


# ----------------------------------------------------------------------------- end to end


def test_evaluate_policy_matches_an_independent_count(chain, monkeypatch):
    tok, params = chain
    samplers, seen = [], []

    class Recording(E.Sampler):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            samplers.append(self)

    monkeypatch.setattr(E, "Sampler", Recording)
    r = E.evaluate_policy(params, CHAIN_CFG, tok, EXAMPLES, template="short", samples=8,
                          max_new_tokens=10, max_prompt_tokens=64, batch_prompts=2,
                          key=jax.random.key(0), pass_ks=(1, 2, 8), rows=True,
                          progress=lambda n: seen.append((n, samplers[0].cache_size())))
    # 3 batches, the last one padded to the same shape: the compiled programs of the first batch
    # serve the others (the count is shared by every Sampler of the process, hence no "== 1").
    assert [n for n, _ in seen] == [2, 4, 5] and len({size for _, size in seen}) == 1

    forms = {f"<think>a</think><answer>{d}</answer>": d for d in "78"}
    c_P, cons_P, greedy_P = [], [], []
    for ex, row in zip(EXAMPLES, r["rows"]):
        digits = [forms[c] for c in row["completions"]]  # KeyError: an unexpected completion
        ok = [float(d) == float(ex["answer"]) for d in digits]
        assert row["correct"] == ok and row["id"] == ex["id"]
        c_P.append(sum(ok))
        winner = max("78", key=lambda d: (digits.count(d), -digits.index(d) if d in digits else -99))
        cons_P.append(float(winner) == float(ex["answer"]))
        assert row["voted"] == winner and row["cons_correct"] == cons_P[-1]
        greedy_P.append(float(forms[row["greedy_completion"]]) == float(ex["answer"]))
        assert row["lengths"] == [7] * 8
    assert sum(c_P[0:1] + c_P[3:4]) > 0 and sum(c_P[1:2] + c_P[4:5]) > 0  # both digits drawn
    assert r["pass_at_1"] == pytest.approx(sum(c_P) / 40)
    assert r["pass_at_2"] == pytest.approx(np.mean([1 - math.comb(8 - c, 2) / 28 for c in c_P]))
    assert r["pass_at_8"] == pytest.approx(np.mean([c > 0 for c in c_P]))
    assert r["pass_at_1"] <= r["pass_at_2"] <= r["pass_at_8"] <= 0.8  # problem c is never right
    assert r["cons_at_k"] == pytest.approx(np.mean(cons_P))
    assert r["greedy_accuracy"] == pytest.approx(np.mean(greedy_P))
    assert len({row["greedy_completion"] for row in r["rows"]}) == 1  # greedy: same state, same text
    assert r["format_rate"] == 1.0 and r["language_consistency"] == 1.0
    assert r["mean_length"] == 7.0 and r["truncated_rate"] == 0.0
    assert (r["problems"], r["samples_per_problem"]) == (5, 8)


def test_eval_main_on_a_hugging_face_directory(hf_dir_factory, tmp_path, capsys):
    d, _ = hf_dir_factory("qwen2")
    out = tmp_path / "ev"
    r = E.eval_main(["--model", str(d), "--task", "arithmetic", "--task-args", '{"digits": [1, 1]}',
                     "--template", "short", "--problems", "3", "--samples", "4",
                     "--pass-ks", "1", "2", "4", "--max-new-tokens", "6",
                     "--max-prompt-tokens", "32", "--batch-prompts", "2", "--out", str(out),
                     "--progress", "False"])
    saved = json.loads((out / "eval.json").read_text())
    assert saved == json.loads(json.dumps(r))
    for key in ("pass_at_1", "pass_at_2", "pass_at_4", "cons_at_k", "greedy_accuracy",
                "format_rate", "language_consistency", "mean_length", "problems",
                "samples_per_problem"):
        assert key in saved, key
    assert saved["problems"] == 3 and len(saved["rows"]) == 3
    correct = [c for row in saved["rows"] for c in row["correct"]]
    assert saved["pass_at_1"] == pytest.approx(np.mean(correct))
    assert saved["pass_at_1"] <= saved["pass_at_2"] <= saved["pass_at_4"]
    assert saved["mean_length"] == pytest.approx(np.mean([n for row in saved["rows"]
                                                          for n in row["lengths"]]))
    assert saved["settings"]["source"] == str(d) and saved["settings"]["template"] == "short"
    md = (out / "eval.md").read_text()
    assert "| pass@4 |" in md and "| cons@4 |" in md and "`arithmetic`" in md
    assert "| pass@1 (mean over samples) |" in capsys.readouterr().out


def test_eval_command_decodes_over_cpu_devices_with_one_devices_results(hf_dir_factory, tmp_path):
    """`grpo-jax eval` (a fresh process) makes one XLA CPU device per core as `grpo-jax run`
    does and decodes over them: the report equals a one-device evaluation's."""
    d, _ = hf_dir_factory("qwen2")
    reports, logs = {}, {}
    for n in (2, 1):
        out = tmp_path / f"ev{n}"
        proc = subprocess.run(
            [sys.executable, "-m", "grpo_jax.cli", "eval", "--model", str(d), "--task",
             "arithmetic", "--task-args", '{"digits": [1, 1]}', "--template", "short",
             "--problems", "4", "--samples", "4", "--max-new-tokens", "6",
             "--max-prompt-tokens", "32", "--batch-prompts", "4", "--out", str(out),
             "--progress", "False", "--cpu-devices", str(n)],
            capture_output=True, text=True, timeout=300,
            env={k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
            | {"JAX_PLATFORMS": "cpu"})
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        logs[n] = proc.stdout
        reports[n] = json.loads((out / "eval.json").read_text())
    assert "decoding on 2 CPU devices" in logs[2] and "decoding on" not in logs[1]
    for r in reports.values():
        r["settings"].pop("source"), r.pop("wall_s", None)
    assert reports[2]["rows"] and reports[2] == reports[1]


def test_eval_main_uses_a_run_directorys_export_and_config(hf_dir_factory, tmp_path, capsys):
    d, _ = hf_dir_factory("qwen2")
    run = tmp_path / "run"
    shutil.copytree(d, run / "hf_model")
    (run / "config.json").write_text(json.dumps({
        "data": {"task": "arithmetic", "task_args": '{"digits": [1, 1], "operators": "+"}',
                 "template": "short", "max_prompt_tokens": 32},
        "sampler": {"max_new_tokens": 6}, "grpo": {}}))
    # The shapes of the test above: its compiled programs serve this one.
    r = E.eval_main(["--model", str(run), "--problems", "2", "--samples", "4", "--batch-prompts",
                     "2", "--out", str(tmp_path / "ev"), "--progress", "False"])
    assert "is a grpo-jax run directory" in capsys.readouterr().out
    s = r["settings"]
    assert s["source"] == str(run / "hf_model") and s["task"] == "arithmetic"
    assert (s["template"], s["max_new_tokens"], s["max_prompt_tokens"]) == ("short", 6, 32)
    assert max(n for row in r["rows"] for n in row["lengths"]) <= 6
    assert "+" in r["rows"][0]["question"]

    (run / "hf_model" / "config.json").unlink()
    with pytest.raises(SystemExit, match="has not finished"):
        E.eval_main(["--model", str(run), "--out", str(tmp_path / "x")])


def test_eval_main_errors_name_the_problem(hf_dir_factory, tmp_path):
    d, _ = hf_dir_factory("qwen2")
    cases = [
        (["--model", str(tmp_path / "missing"), "--task", "arithmetic"], "missing: no such file"),
        (["--model", str(tmp_path), "--task", "arithmetic"], "no config.json"),
        (["--model", str(d), "--task", "arithmetik"], "Did you mean 'arithmetic'"),
        (["--model", str(d)], "--task is required"),
        (["--model", str(d), "--task", "arithmetic", "--task-args", "[1]"], "JSON object"),
        (["--model", str(d), "--task", "arithmetic", "--task-args", '{"nums": 3}'],
         "do not fit task 'arithmetic'.*nums"),
        (["--model", str(d), "--task", "arithmetic", "--samples", "4", "--pass-ks", "8"], "pass_ks"),
        (["--model", str(d), "--task", "arithmetic", "--reward", "acuracy"], "unknown reward"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            E.eval_main(argv + ["--out", str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
