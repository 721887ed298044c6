"""Rejection sampling: every check against an independent recount, dedupe and caps, sampling
through the real sampler, the dataset round trip into the SFT encoder, and the command."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from test_evaluation import CHAIN_CFG, EXAMPLES, chain_policy

from grpo_jax import evaluation as E
from grpo_jax import rejection as R
from grpo_jax.rewards import accuracy_reward
from grpo_jax.rewards.format import is_strict_format
from grpo_jax.rewards.language import language_share, reasoning_text
from grpo_jax.rewards.length import repetition_penalty
from grpo_jax.sft import encode_pairs
from grpo_jax.tasks.tokenizers import char_tokenizer

# Two prompts x 6 samples; the second prompt has no id (its index, 1, stands in).
CHOSEN_EXAMPLES = [{"id": "x", "question": "Compute 3+4.", "answer": "7"},
                   {"question": "Compute 2*3.", "answer": "6"}]
CHOSEN = [
    "<think>three plus four is seven</think> <answer>7</answer>",  # kept
    "<think>three  plus four is seven</think>\n<answer>7</answer>",  # duplicate up to whitespace
    "<think>three plus four is eight</think> <answer>8</answer>",  # wrong
    "three plus four is seven. <answer>7</answer>",  # not in the strict format
    "<think>三加四 is seven</think> <answer>7</answer>",  # mixed script: 7/10 letters latin
    "<think>seven seven seven seven seven seven seven</think> <answer>7</answer>",  # repetitive
    "<think>two times three is six</think> <answer>6</answer>",  # 3 tokens: too short
    "<think>2*3 = 6</think> <answer>6.0</answer>",  # 50 tokens: too long
    "<think>two times three</think> <answer>6</answer>",  # truncated
    "<think>doubling three gives six</think> <answer>6</answer>",  # kept
    "<think>six</think> <answer>6</answer>",  # kept (the second of prompt 1)
    "5",  # wrong and unformatted: fails two checks
]
LENGTHS = np.array([20] * 6 + [3, 50, 20, 20, 20, 20])
TRUNCATED = np.array([False] * 8 + [True] + [False] * 3)
RCFG = R.RejectionConfig(samples_per_prompt=6, max_new_tokens=64, min_tokens=4, max_tokens=40)


def _chosen():
    return E.Generations(prompts=["P0", "P1"], completions=CHOSEN, lengths_N=LENGTHS,
                         truncated_N=TRUNCATED, group_size=6)


def _recount(examples, gens, rcfg):
    """Each check applied directly to each sample: {check: passed [N]}."""
    g = gens.group_size
    gold = [ex["answer"] for ex in examples for _ in range(g)]
    comps = gens.completions
    acc = np.array(accuracy_reward([""] * len(comps), comps, answer=gold)) == 1.0
    return {
        "correct": acc,
        "format": np.array([is_strict_format(c) for c in comps]),
        "language": np.array([language_share(reasoning_text(c)) >= rcfg.language_threshold
                              for c in comps]),
        "repetition": np.array([-repetition_penalty(c, 3) <= rcfg.max_repetition for c in comps]),
        "length": (gens.lengths_N >= rcfg.min_tokens) & (gens.lengths_N <= rcfg.max_tokens),
        "complete": ~gens.truncated_N,
    }


def test_config_errors_name_the_field():
    bad = [dict(samples_per_prompt=0), dict(temperature=0.0), dict(top_p=0.0),
           dict(max_new_tokens=0), dict(reward="acuracy"), dict(language_threshold=1.5),
           dict(max_repetition=1.0), dict(repetition_ngram=0), dict(min_tokens=-1),
           dict(max_tokens=2000), dict(min_tokens=5, max_tokens=4), dict(max_per_prompt=0)]
    for kw in bad:
        field = next(iter(kw)) if "max_tokens" not in kw else "max_tokens"
        with pytest.raises(ValueError, match=f"^{field}: "):
            R.RejectionConfig(**kw)
    assert R.RejectionConfig(temperature=0.0, samples_per_prompt=1).checks == \
        ("correct", "format", "language", "repetition", "complete")
    assert RCFG.checks == R.CHECKS
    off = R.RejectionConfig(require_correct=False, require_format=False, require_language=False,
                            max_repetition=None, require_complete=False)
    assert off.checks == ()


def test_statistics_equal_an_independent_count():
    gens = _chosen()
    rows, stats = R.filter_samples(CHOSEN_EXAMPLES, gens, RCFG, source="ckpt")
    want = _recount(CHOSEN_EXAMPLES, gens, RCFG)
    assert stats["failed"] == {c: int((~want[c]).sum()) for c in R.CHECKS}
    assert stats["failed"] == {"correct": 2, "format": 2, "language": 1, "repetition": 1,
                               "length": 2, "complete": 1}  # the comments of CHOSEN
    ok = np.all([want[c] for c in R.CHECKS], axis=0)
    assert stats["passed_checks"] == ok.sum() == 4
    assert (stats["duplicates"], stats["capped"], stats["accepted"]) == (1, 0, 3)
    assert stats["acceptance_rate"] == 3 / 12 and stats["samples"] == 12
    assert stats["prompts"] == 2 and stats["prompts_with_accepted"] == 2
    assert [(r["prompt_id"], r["sample_index"]) for r in rows] == [("x", 0), (1, 3), (1, 4)]
    r0 = rows[0]
    assert r0["prompt"] == "P0" and r0["question"] == "Compute 3+4." and r0["answer"] == "7"
    assert r0["completion"] == CHOSEN[0] and r0["tokens"] == 20 and r0["source"] == "ckpt"
    assert r0["rewards"] == {"correct": 1.0, "format": 1.0, "language": 1.0, "repetition": 0.0}

    capped_rows, capped = R.filter_samples(CHOSEN_EXAMPLES, gens,
                                           dataclasses.replace(RCFG, max_per_prompt=1), source="c")
    assert (capped["capped"], capped["accepted"]) == (1, 2)
    assert [(r["prompt_id"], r["sample_index"]) for r in capped_rows] == [("x", 0), (1, 3)]
    _, kept_dupes = R.filter_samples(CHOSEN_EXAMPLES, gens, dataclasses.replace(RCFG, dedupe=False),
                                     source="c")
    assert (kept_dupes["duplicates"], kept_dupes["accepted"]) == (0, 4)
    # Only the enabled checks reject: without format and language checks, 3 and 4 are kept too.
    loose = dataclasses.replace(RCFG, require_format=False, require_language=False)
    loose_rows, loose_stats = R.filter_samples(CHOSEN_EXAMPLES, gens, loose, source="c")
    assert set(loose_stats["failed"]) == {"correct", "repetition", "length", "complete"}
    assert [r["sample_index"] for r in loose_rows if r["prompt_id"] == "x"] == [0, 3, 4]


def test_rejection_sample_through_the_sampler():
    tok = char_tokenizer(tags=True)
    params = chain_policy(tok)
    rcfg = R.RejectionConfig(samples_per_prompt=8, max_new_tokens=10)
    kw = dict(template="short", key=jax.random.key(3), max_prompt_tokens=64, batch_prompts=2)
    rows, stats = R.rejection_sample(params, CHAIN_CFG, tok, EXAMPLES, rcfg, source="chain", **kw)
    # The same sampling call, whose samples are then counted here.
    (gens,) = E.sample_completions(params, CHAIN_CFG, tok, EXAMPLES, max_new_tokens=10,
                                   decodings=[E.Decoding(samples=8, temperature=0.6, top_p=0.95)],
                                   **kw)
    want = _recount(EXAMPLES, gens, dataclasses.replace(rcfg, min_tokens=0, max_tokens=10))
    assert stats["failed"] == {c: int((~want[c]).sum()) for c in rcfg.checks}
    assert stats["failed"]["format"] == 0 and 0 < stats["failed"]["correct"] < 40
    passed = np.all([want[c] for c in rcfg.checks], axis=0)
    distinct = {(i // 8, gens.completions[i]) for i in np.flatnonzero(passed)}
    assert stats["passed_checks"] == passed.sum()
    assert stats["duplicates"] == passed.sum() - len(distinct)
    assert stats["accepted"] == len(rows) == len(distinct)
    # Each prompt has one correct text (its gold digit), problem c (gold 9) none.
    for r in rows:
        gold = next(ex["answer"] for ex in EXAMPLES if ex["id"] == r["prompt_id"])
        assert r["completion"] == f"<think>a</think><answer>{int(float(gold))}</answer>"
        assert r["tokens"] == 7 and r["source"] == "chain"
    assert "c" not in {r["prompt_id"] for r in rows}
    assert stats["prompts_with_accepted"] == len(rows) <= 4


def test_dataset_round_trip_into_the_sft_encoder(tmp_path):
    rows, stats = R.filter_samples(CHOSEN_EXAMPLES, _chosen(), RCFG, source="ckpt")
    path = R.write_dataset(rows, stats, tmp_path / "data" / "rs.jsonl")
    assert sorted(p.name for p in path.parent.iterdir()) == ["rs.jsonl", "rs.stats.json"]
    assert R.stats_path(path) == tmp_path / "data" / "rs.stats.json"
    assert json.loads(R.stats_path(path).read_text()) == json.loads(json.dumps(stats))
    back = R.read_dataset(path)
    assert back == rows
    pairs = R.sft_pairs(back)
    assert pairs == [("P0", CHOSEN[0]), ("P1", CHOSEN[9]), ("P1", CHOSEN[10])]
    tok = char_tokenizer(tags=True, extra_chars="三加四")
    tokens, attn, loss = encode_pairs(tok, pairs, 128, prompt_loss=False)
    for i, (_, completion) in enumerate(pairs):  # the loss covers exactly completion + EOS
        assert tok.decode(tokens[i][loss[i]]) == completion + tok.eos_token


def test_read_dataset_errors_name_file_and_line(tmp_path):
    good = {"prompt_id": "x", "prompt": "P", "question": "q", "completion": "c", "answer": "7",
            "sample_index": 0, "source": "s", "rewards": {}, "tokens": 3}
    cases = [
        ([json.dumps(good), "", '{"prompt_id": "x", '], r"line 3: not valid JSON"),
        ([json.dumps(good), json.dumps({k: v for k, v in good.items() if k != "completion"})],
         r"line 2: missing field\(s\) \['completion'\]"),
        ([json.dumps(good | {"tokens": "3"})], r"line 1: field 'tokens' is str, expected int"),
        ([json.dumps(good | {"sample_index": True})], r"line 1: field 'sample_index' is bool"),
        (["[1, 2]"], r"line 1: expected a JSON object"),
    ]
    for lines, message in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(ValueError, match=f"bad.jsonl, {message}"):
            R.read_dataset(path)
    path.write_text(json.dumps(good) + "\n\n")
    assert R.read_dataset(path) == [good]


def test_rejection_main_writes_the_dataset(hf_dir_factory, tmp_path, capsys):
    d, _ = hf_dir_factory("qwen2")
    out = tmp_path / "rs.jsonl"
    argv = ["--model", str(d), "--task", "arithmetic", "--task-args", '{"digits": [1, 1]}',
            "--template", "short", "--prompts", "3", "--samples", "4", "--max-new-tokens", "6",
            "--max-prompt-tokens", "32", "--batch-prompts", "2", "--out", str(out),
            "--progress", "False"]
    # An untrained model passes no content check: switch them off, keep dedupe.
    stats = R.rejection_main(argv + ["--require-correct", "False", "--require-format", "False",
                                     "--require-language", "False", "--max-repetition", "None",
                                     "--require-complete", "False"])
    assert stats["samples"] == stats["prompts"] * 4 and stats["failed"] == {}
    assert stats["accepted"] == stats["samples"] - stats["duplicates"] > 0
    rows = R.read_dataset(out)
    assert len(rows) == stats["accepted"] and {r["source"] for r in rows} == {str(d)}
    assert json.loads(R.stats_path(out).read_text())["settings"]["split"] == "train"
    assert "kept" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no such file"):
        R.rejection_main(["--model", str(tmp_path / "nope"), "--task", "arithmetic",
                          "--out", str(out)])
    with pytest.raises(SystemExit, match="^grpo-jax rejection-sample: error: max_tokens: "):
        R.rejection_main(argv + ["--max-tokens", "100"])
