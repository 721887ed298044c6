"""Model-based rewards: a judge LM and a scalar reward model on tiny random-init models."""

import functools
import json
import logging

import jax

import numpy as np
import pytest

from grpo_jax import hf_io
from grpo_jax import model as M
from grpo_jax.rewards import REWARDS, format_reward, get_reward
from grpo_jax.rewards import model_based as MB
from grpo_jax.rewards.combine import score_completions
from hf_models import char_tokenizer, hf_config

TEMPLATE = "Q:{question}\nA:{response}\nok?"
QUESTIONS = ["1+2", "what is 7*6?", "x", "9-3=?", "name a color"]
RESPONSES = ["3", "<think>6*7</think> <answer>42</answer>", "y", "it is 6, done", "blue"]


@pytest.fixture(scope="module")
def judge_dir(hf_dir_factory):
    # A wide init, so that the verdict probabilities differ from row to row (a test that mixed up
    # rows would then fail).
    d, _ = hf_dir_factory("qwen2", initializer_range=0.5)
    return d


@pytest.fixture
def registry():
    """Names registered by a test are removed afterwards."""
    before = set(REWARDS)
    yield
    for name in set(REWARDS) - before:
        del REWARDS[name]


_DIRECT_LEN = 96


@functools.lru_cache(maxsize=None)
def _loaded(path):
    cfg, params = hf_io.load(path)
    return cfg, params, hf_io.load_tokenizer(path), jax.jit(M.forward, static_argnums=2)


def _direct_prob(judge_dir, text, yes=("Y",), no=("N",)):
    """p(yes) / (p(yes) + p(no)) (and the log-odds) from model.forward's logits at the text's
    last token: one row, right-padded to a fixed length so that one compile serves every text
    (causal attention: the pads after the last token cannot change its logits)."""
    cfg, params, tok, forward = _loaded(str(judge_dir))
    ids = tok(text)["input_ids"]
    tokens = np.zeros((1, _DIRECT_LEN), np.int32)
    tokens[0, :len(ids)] = ids
    logits = np.asarray(forward(params, tokens, cfg, tokens != -1)[0, len(ids) - 1], np.float64)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    py = sum(p[tok.convert_tokens_to_ids(t)] for t in yes)
    pn = sum(p[tok.convert_tokens_to_ids(t)] for t in no)
    return py / (py + pn), np.log(py) - np.log(pn)


def test_judge_equals_p_yes_over_p_yes_plus_no_from_forward_logits(judge_dir):
    judge = MB.make_judge_reward(judge_dir, prompt_template=TEMPLATE, yes_tokens=("Y",),
                                 no_tokens=("N",), batch_size=4, length_bucket=16)
    got = judge(QUESTIONS, RESPONSES)  # 5 rows: a batch of 4 and a batch of 1
    want = [_direct_prob(judge_dir, TEMPLATE.format(question=q, response=r))[0]
            for q, r in zip(QUESTIONS, RESPONSES)]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert np.ptp(want) > 0.05  # the rows really differ
    # Two yes tokens add their probabilities; log-odds output.
    lo = MB.make_judge_reward(judge_dir, prompt_template=TEMPLATE, yes_tokens=["Y", "y"],
                              no_tokens=("N",), output="logodds", scale=2.0, shift=-1.0)
    want_lo = [_direct_prob(judge_dir, TEMPLATE.format(question=q, response=r), yes=("Y", "y"))[1]
               for q, r in zip(QUESTIONS, RESPONSES)]
    np.testing.assert_allclose(lo(QUESTIONS, RESPONSES), 2.0 * np.array(want_lo) - 1.0, atol=1e-4)


def test_judge_row_score_does_not_depend_on_batch_or_padding(judge_dir):
    judge = MB.make_judge_reward(judge_dir, prompt_template=TEMPLATE, yes_tokens=("Y",),
                                 no_tokens=("N",), batch_size=8, length_bucket=16)
    alone = judge(["1+1"], ["2"])[0]
    longer = ["a much longer response " * 3 + str(i) for i in range(5)]
    batched = judge(["1+1"] + ["q"] * 5, ["2"] + longer)
    assert batched[0] == pytest.approx(alone, abs=1e-6)
    assert len(set(np.round(batched, 6))) > 1


def test_judge_does_not_recompile_within_a_bucket(judge_dir):
    # length_bucket=48 is used by no other test, so this test's shapes are new to the jit cache.
    judge = MB.make_judge_reward(judge_dir, prompt_template=TEMPLATE, yes_tokens=("Y",),
                                 no_tokens=("N",), batch_size=8, length_bucket=48)

    def traces(n, offset=0):
        before = MB.TRACES["judge"]
        judge([f"{i + offset}+1" for i in range(n)], [str(i + offset) for i in range(n)])
        return MB.TRACES["judge"] - before

    assert traces(3) == 1  # 4 rows x 48 tokens: compiled once
    assert traces(4, offset=10) == 0  # same bucket, other texts
    assert traces(3, offset=20) == 0
    assert traces(5) == 1  # 8 rows: a new bucket
    assert traces(8, offset=30) == 0
    assert traces(11) == 0  # a full batch of 8 and a batch of 3 (bucket 4): both compiled


def test_judge_truncates_from_the_left_and_warns(judge_dir, caplog):
    judge = MB.make_judge_reward(judge_dir, prompt_template=TEMPLATE, yes_tokens=("Y",),
                                 no_tokens=("N",), max_len=20, length_bucket=8)
    long_resp = "abcdefghij" * 4
    with caplog.at_level(logging.WARNING, logger="grpo_jax.rewards.model_based"):
        got = judge(["q", "q"], [long_resp, "s"])
    assert judge.truncated == 1
    assert "1 of 2 inputs were longer than max_len=20" in caplog.text
    text = TEMPLATE.format(question="q", response=long_resp)
    assert got[0] == pytest.approx(_direct_prob(judge_dir, text[-20:])[0], abs=1e-5)  # 1 char = 1 token


def test_judge_options_are_checked(judge_dir):
    with pytest.raises(ValueError, match="'Yes' is 3 tokens"):
        MB.make_judge_reward(judge_dir, lazy=False)  # the char tokenizer spells Yes in 3 tokens
    with pytest.raises(ValueError, match="both yes and no"):
        MB.make_judge_reward(judge_dir, yes_tokens=("Y",), no_tokens=("Y",), lazy=False)
    with pytest.raises(ValueError, match="must contain {response}"):
        MB.JudgeSpec(path=str(judge_dir), prompt_template="{question} only")
    with pytest.raises(ValueError, match="output must be"):
        MB.JudgeSpec(path=str(judge_dir), output="odds")
    with pytest.raises(hf_io.CheckpointError, match="not a directory"):
        MB.make_judge_reward("/no/such/judge")


def test_judge_text_uses_question_field_and_after_think(judge_dir):
    judge = MB.make_judge_reward(judge_dir, prompt_template="[{question}|{response}]",
                                 yes_tokens=("Y",), no_tokens=("N",), response="after_think")
    texts = judge.texts(["User: 2+2 {response}. Assistant:"], ["<think>hm</think> <answer>4</answer>"],
                        {"question": ["2+2"]})
    assert texts == ["[2+2|<answer>4</answer>]"]
    assert judge.texts(["P {response}"], ["r"], {}) == ["[P {response}|r]"]  # no field: the prompt


def test_chat_template_texts(judge_dir, tmp_path):
    import shutil

    d = tmp_path / "chat_judge"
    shutil.copytree(judge_dir, d)
    # In tokenizer_config.json: hf_io.load_tokenizer's fallback for this tokenizer reads the
    # template from there (not from chat_template.jinja).
    conf = json.loads((d / "tokenizer_config.json").read_text())
    conf["chat_template"] = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                             "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    (d / "tokenizer_config.json").write_text(json.dumps(conf))
    judge = MB.make_judge_reward(d, prompt_template="{question}={response}?", chat_template=True,
                                 yes_tokens=("Y",), no_tokens=("N",))
    assert judge.texts(["p"], ["4"], {"question": ["2+2"]}) == ["<user>2+2=4?<assistant>"]
    assert judge.texts(["p"], ["4"], {"question": [None]}) == ["<user>p=4?<assistant>"]
    value = judge(["p"], ["4"], question=["2+2"])[0]
    assert value == pytest.approx(_direct_prob(d, "<user>2+2=4?<assistant>")[0], abs=1e-5)


def test_a_judge_that_fails_to_load_is_loaded_once_and_scores_zero(judge_dir, tmp_path, registry):
    d = tmp_path / "broken"
    d.mkdir()
    (d / "config.json").write_text((judge_dir / "config.json").read_text())  # no weights
    MB.register_model_reward("t_broken", path=d, yes_tokens=("Y",), no_tokens=("N",))
    calls = []
    original = MB.load_judge

    def counting(*args):
        calls.append(args)
        return original(*args)

    MB.load_judge = counting
    try:
        out = score_completions(["p"] * 3, ["a", "b", "c"], {}, {"t_broken": 1.0})
    finally:
        MB.load_judge = original
    assert out.failures == {"t_broken": 3} and list(out.total) == [0.0, 0.0, 0.0]
    assert len(calls) == 1  # the per-example retries did not reload
    with pytest.raises(RuntimeError, match="failed to load earlier"):
        get_reward("t_broken")(["p"], ["a"])


# ----------------------------------------------------------------------------- reward model


def _make_rm(path, arch, seed=0):
    """A tiny random `*ForSequenceClassification` with num_labels=1 and pad_token_id=0."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = hf_config(arch, num_labels=1, pad_token_id=0, initializer_range=0.2)
    cls = {"qwen2": "Qwen2ForSequenceClassification", "llama": "LlamaForSequenceClassification"}
    rm = getattr(transformers, cls[arch])(cfg).eval()
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    rm.save_pretrained(path)
    char_tokenizer(cfg.vocab_size).save_pretrained(path)
    return rm


@pytest.fixture(scope="module")
def rm_factory(tmp_path_factory):
    made = {}

    def make(arch):
        if arch not in made:
            d = tmp_path_factory.mktemp(f"rm_{arch}")
            made[arch] = (d, _make_rm(d, arch))
        return made[arch]

    return make


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def rm_dir(request, rm_factory):
    return rm_factory(request.param)


@pytest.fixture(scope="module")
def qwen_rm_dir(rm_factory):
    return rm_factory("qwen2")


def test_reward_model_matches_transformers(rm_dir):
    import torch

    d, rm = rm_dir
    rng = np.random.default_rng(0)
    lengths = [12, 7, 3, 10]
    tokens = np.zeros((4, 12), np.int64)  # right padding with pad_token_id = 0
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(4, 128, n)
    tokens[3, 9] = 0  # a real token equal to the pad id, last: transformers pools before it
    mask = np.zeros_like(tokens)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    with torch.no_grad():
        theirs = rm(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits[:, 0]
    m = MB.load_reward_model(str(d))
    assert m.pad_token_id == 0 and m.head_DxC.shape == (64, 1) and "lm_head" not in m.params
    ours = np.asarray(MB.reward_model_scores(m.params, m.head_DxC, m.cfg, tokens, mask, 0))
    np.testing.assert_allclose(ours, theirs.numpy(), atol=1e-4)
    assert np.ptp(ours) > 1e-2
    # The same rows left-padded score the same (positions count real tokens only).
    left = np.zeros_like(tokens)
    lmask = np.zeros_like(mask)
    for i, n in enumerate(lengths):
        left[i, 12 - n:], lmask[i, 12 - n:] = tokens[i, :n], 1
    np.testing.assert_allclose(
        np.asarray(MB.reward_model_scores(m.params, m.head_DxC, m.cfg, left, lmask, 0)), ours,
        atol=1e-5)


def test_sequence_classifier_and_causal_lm_loaders_refuse_each_other(rm_dir, judge_dir):
    d, _ = rm_dir
    with pytest.raises(hf_io.CheckpointError, match="load_sequence_classifier"):
        hf_io.load(d)
    with pytest.raises(hf_io.CheckpointError, match="needs score.weight"):
        hf_io.load_sequence_classifier(judge_dir)


# ----------------------------------------------------------------------------- registry


def test_registered_model_rewards_score_beside_format(judge_dir, qwen_rm_dir, registry):
    d_rm, _ = qwen_rm_dir
    judge = MB.register_model_reward("t_helpful", kind="judge", path=judge_dir,
                                     prompt_template=TEMPLATE, yes_tokens=("Y",), no_tokens=("N",))
    rm = MB.register_model_reward("t_rm", kind="reward_model", path=d_rm, chat_template=False)
    assert get_reward("t_helpful") is judge and get_reward("t_rm") is rm
    prompts = [f"User: {q}. Assistant:" for q in QUESTIONS]
    out = score_completions(prompts, RESPONSES, {"question": QUESTIONS},
                            {"format": 1.0, "t_helpful": 0.5, "t_rm": 0.25}, on_error="raise")
    fmt = np.array(format_reward(prompts, RESPONSES))
    want_judge = [_direct_prob(judge_dir, TEMPLATE.format(question=q, response=r))[0]
                  for q, r in zip(QUESTIONS, RESPONSES)]
    np.testing.assert_allclose(out.per_reward["t_helpful"], want_judge, atol=1e-5)
    m = MB.load_reward_model(str(d_rm))
    want_rm = []
    for q, r in zip(QUESTIONS, RESPONSES):  # each row alone, right-padded to one fixed length
        ids = m.tokenizer(f"{q}\n{r}")["input_ids"]
        tokens, mask = np.zeros((1, _DIRECT_LEN), np.int32), np.zeros((1, _DIRECT_LEN), bool)
        tokens[0, :len(ids)], mask[0, :len(ids)] = ids, True
        want_rm.append(float(MB.reward_model_scores(m.params, m.head_DxC, m.cfg, tokens, mask, 0)[0]))
    np.testing.assert_allclose(out.per_reward["t_rm"], want_rm, atol=1e-5)
    np.testing.assert_allclose(out.total, fmt + 0.5 * np.array(want_judge) + 0.25 * np.array(want_rm),
                               atol=1e-5)
    assert fmt.sum() == 1 and out.failures == {"format": 0, "t_helpful": 0, "t_rm": 0}
    spec = MB.model_reward_specs()
    assert spec["t_rm"]["kind"] == "reward_model" and spec["t_helpful"]["yes_tokens"] == ("Y",)


def test_registration_is_idempotent_and_refuses_a_different_model_under_a_taken_name(
        judge_dir, qwen_rm_dir, registry):
    kw = dict(prompt_template=TEMPLATE, yes_tokens=("Y",), no_tokens=("N",))
    first = MB.register_model_reward("t_judge", path=judge_dir, **kw)
    assert MB.register_model_reward("t_judge", path=judge_dir, **kw) is first
    with pytest.raises(ValueError, match="already registered"):
        MB.register_model_reward("t_judge", path=judge_dir, **{**kw, "no_tokens": ("n",)})
    with pytest.raises(ValueError, match="already registered"):
        MB.register_model_reward("format", path=judge_dir, **kw)  # a rule reward's name
    other = MB.register_model_reward("t_judge", path=judge_dir, overwrite=True,
                                     **{**kw, "no_tokens": ("n",)})
    assert get_reward("t_judge") is other
    rm = MB.register_model_reward("t_rm_chat", kind="reward_model", path=qwen_rm_dir[0])
    with pytest.raises(ValueError, match="no chat template"):
        rm(["q"], ["r"])
    with pytest.raises(ValueError, match="kind must be"):
        MB.register_model_reward("t_x", kind="critic", path=judge_dir)


def test_experiment_file_declares_a_model_reward(judge_dir, tmp_path, registry):
    from grpo_jax.runner import load_experiment

    exp = tmp_path / "judged.py"
    exp.write_text(f'''
from grpo_jax.config import Experiment, ModelSource, RewardConfig
from grpo_jax.rewards.model_based import register_model_reward

register_model_reward("exp_helpful", kind="judge", path={str(judge_dir)!r},
                      prompt_template="{{question}}={{response}}?", yes_tokens=("Y",), no_tokens=("N",))

CONFIG = Experiment(model=ModelSource(path={str(judge_dir)!r}),
                    rewards=RewardConfig(weights=(("format", 1.0), ("exp_helpful", 0.5))))
''')
    cfg = load_experiment(exp)
    load_experiment(exp)  # executing the file again re-registers the same reward: no error
    assert dict(cfg.rewards.weights)["exp_helpful"] == 0.5
    judge = get_reward("exp_helpful")
    assert judge._model is None  # lazy: loading the experiment did not load the judge
    out = score_completions(["p"], ["r"], {}, dict(cfg.rewards.weights))
    assert 0.0 < out.per_reward["exp_helpful"][0] < 1.0 and judge.rows == 1
