"""The GRPO trainer, the runner and the experiment files."""

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import model as M
from grpo_jax.config import (CheckpointConfig, DataConfig, EvalConfig, Experiment, GRPOConfig,
                             LogConfig, ModelConfig, ModelSource, OptimConfig, PretrainConfig,
                             RewardConfig, SamplerConfig)
from grpo_jax.pipeline import Pipeline
from grpo_jax.runner import load_experiment, run
from grpo_jax.tasks import get_task
from grpo_jax.tasks.tokenizers import char_tokenizer
from grpo_jax.trainer import GRPOTrainer, select_groups

ROOT = Path(__file__).parent.parent
TINY = ModelConfig(arch="qwen2", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=1,
                   num_heads=2, num_kv_heads=1, attention_bias=True, tie_word_embeddings=True)


def _exp(**kw):
    base = dict(
        seed=0, steps=2, prompts_per_step=4, model=ModelSource(init=TINY),
        data=DataConfig(task="arithmetic", task_args='{"digits": [1, 1], "operators": "+"}',
                        template="short", max_prompt_tokens=32, eval_problems=8),
        sampler=SamplerConfig(max_new_tokens=12, temperature=1.0),
        grpo=GRPOConfig(group_size=4, kl_coef=0.04), optim=OptimConfig(lr=1e-2),
        rewards=RewardConfig(weights=(("accuracy", 1.0), ("format_partial", 1.0))),
        eval=EvalConfig(samples=2, batch_prompts=8), log=LogConfig(progress=False, tensorboard=False))
    base.update(kw)
    return Experiment(**base)


def _trainer(exp):
    tok = char_tokenizer(tags=True)
    params = M.init_params(exp.model.init, jax.random.key(0), std=0.2)
    task = get_task(exp.data.task, **exp.data.task_kwargs)
    return GRPOTrainer(exp, exp.model.init, tok, task), params


def test_one_step_updates_params_and_reports_finite_metrics():
    exp = _exp()
    tr, params = _trainer(exp)
    state = tr.init_state(jax.tree.map(jnp.array, params))
    state, dev, host = tr.step(state, params, 0)
    m = {k: float(v) for k, v in jax.device_get(dev).items()}
    for k in ("loss", "kl", "entropy", "grad_norm", "clip_frac", "ratio_mean", "logp_gap_sampler"):
        assert np.isfinite(m[k]), k
    assert abs(m["ratio_mean"] - 1) < 1e-4  # mu = 1: on-policy
    assert m["logp_gap_sampler"] < 1e-3  # the sampler and the trainer agree on log-probs
    assert m["grad_norm"] > 0
    assert int(state.step) == 1
    diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), state.params, params)
    assert max(jax.tree.leaves(diff)) > 0
    assert 0 <= host["reward"] and host["response_length"] > 0
    assert {"reward/accuracy", "reward/format_partial", "zero_std_frac"} <= host.keys()


def test_nonfinite_loss_skips_the_update(monkeypatch):
    from grpo_jax import loss as L

    exp = _exp()
    tr, params = _trainer(exp)
    state = tr.init_state(jax.tree.map(jnp.array, params))
    before = jax.device_get((state.params, state.opt_state))
    real = L.compute_advantages
    monkeypatch.setattr(L, "compute_advantages", lambda r, *a, **k: real(r, *a, **k) * np.nan)
    state, dev, host = tr.step(state, params, 0)
    m = jax.device_get(dev)
    assert float(m["skipped_updates"]) == 1 and not np.isfinite(float(m["loss"]))
    assert int(state.step) == 0 and host["nonfinite_logps"] == 0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(jax.device_get(
            (state.params, state.opt_state)))):
        np.testing.assert_array_equal(a, b)


def test_nonfinite_sampler_logprobs_skip_the_update():
    exp = _exp()
    tr, params = _trainer(exp)
    params = dict(params, final_norm=params["final_norm"] * np.nan)
    state = tr.init_state(jax.tree.map(jnp.array, params))
    state, dev, host = tr.step(state, params, 0)
    assert host["nonfinite_logps"] == 1 and float(dev["skipped_updates"]) == 1
    assert int(state.step) == 0


def test_beta_zero_needs_no_reference_and_second_step_does_not_recompile():
    exp = _exp(grpo=GRPOConfig(group_size=4, kl_coef=0.0))
    tr, params = _trainer(exp)
    state = tr.init_state(params)
    state, _, _ = tr.step(state, None, 0)  # no reference params at all
    sizes = (tr._update._cache_size(), tr.sampler.cache_size())
    state, _, _ = tr.step(state, None, 1)
    assert (tr._update._cache_size(), tr.sampler.cache_size()) == sizes


@pytest.mark.parametrize("aggregation", ["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"])
def test_micro_batch_accumulation_equals_one_batch(aggregation):
    """Gradient accumulation must give the same update as the whole minibatch at once (DAPO's
    token mean needs each micro-batch weighted by its token share)."""
    results = []
    for micro in (1, 4):
        exp = _exp(grpo=GRPOConfig(group_size=4, kl_coef=0.1, aggregation=aggregation),
                   optim=OptimConfig(lr=1e-2, micro_batches=micro, clip_norm=0.0))
        tr, params = _trainer(exp)
        rng = np.random.default_rng(0)
        b, g, p, t = 4, 4, 8, exp.sampler.max_new_tokens
        lens = rng.integers(1, t + 1, (b, g))
        gen = np.arange(t)[None, None] < lens[..., None]
        batch = dict(prompt=rng.integers(4, 90, (b, p)).astype(np.int32),
                     prompt_mask=np.ones((b, p), bool),
                     comp=rng.integers(4, 90, (b, g, t)).astype(np.int32), gen_mask=gen,
                     loss_mask=gen, adv=rng.normal(size=(b, g)).astype(np.float32),
                     sampler_logps=np.zeros((b, g, t), np.float32),
                     ref_logps=rng.normal(-3, 0.3, (b, g, t)).astype(np.float32))
        state, metrics = tr._update(tr.init_state(params), batch, jax.random.key(0))
        results.append((state.params, float(metrics["loss"]), float(metrics["grad_norm"])))
    (p1, l1, g1), (p4, l4, g4) = results
    # Adam's first step is nearly sign(g) * lr, blind to a wrong scale: compare the gradient norm.
    assert abs(l1 - l4) < 1e-5
    assert abs(g1 - g4) < 1e-5 * g1
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_mu_two_reuses_the_rollout_with_stored_old_logps():
    exp = _exp(grpo=GRPOConfig(group_size=4, kl_coef=0.0, mu=2, minibatches=2, eps_low=0.01,
                               eps_high=0.01), optim=OptimConfig(lr=5e-2))
    tr, params = _trainer(exp)
    assert tr.reuse_rollout
    state, dev, _ = tr.step(tr.init_state(params), None, 0)
    m = jax.device_get(dev)
    # After the first minibatch update the policy moved, so later ratios differ from 1 and the
    # tight clip range acts: with old = current (a missing old log-prob store) both would be 0/1.
    assert float(m["ratio_max"]) > 1.0 + 1e-4 or float(m["ratio_min"]) < 1.0 - 1e-4
    assert int(state.step) == 4  # mu x minibatches optimizer updates


def test_select_groups_modes():
    r = np.array([[1, 1, 1], [0, 1, 0], [0, 0, 0], [1, 0, 0]], np.float32)
    idx, keep = select_groups(r, 2, "dynamic")
    assert list(idx) == [1, 3] and keep.all()
    idx, keep = select_groups(r, 4, "drop")
    assert list(idx) == [0, 1, 2, 3] and list(keep) == [False, True, False, True]
    idx, keep = select_groups(r, 3, "dynamic")  # only two informative groups: fill with a zero-std one
    assert list(idx) == [1, 3, 0] and list(keep) == [True, True, False]
    idx, keep = select_groups(r, 4, "keep")
    assert keep.all()


def test_config_errors_name_field_and_range():
    with pytest.raises(ValueError, match=r"grpo.group_size: must be >= 2"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match=r"grpo.aggregation: got 'mean', allowed values are"):
        GRPOConfig(aggregation="mean")
    with pytest.raises(ValueError, match=r"prompts_per_step = 3 must split evenly into grpo.minibatches"):
        _exp(prompts_per_step=3, grpo=GRPOConfig(group_size=4, minibatches=2))
    with pytest.raises(ValueError, match="data.task_args: not a JSON object"):
        DataConfig(task_args="{digits: 1}")


def test_every_experiment_file_loads():
    files = sorted((ROOT / "experiments").glob("*.py"))
    assert files
    for f in files:
        assert isinstance(load_experiment(f), (Experiment, Pipeline))


def test_tiny_experiment_runs_end_to_end(tmp_path):
    exp = load_experiment(ROOT / "experiments" / "tiny_r1_zero.py")
    exp = dataclasses.replace(
        exp, steps=2, run_dir=str(tmp_path / "run"), prompts_per_step=4,
        pretrain=PretrainConfig(steps=3, batch_size=8),
        data=dataclasses.replace(exp.data, eval_problems=8),
        eval=dataclasses.replace(exp.eval, samples=2, batch_prompts=8),
        log=dataclasses.replace(exp.log, progress=True), checkpoint=CheckpointConfig(every=1, keep=2))
    summary = run(exp, name="tiny")
    d = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "eval.jsonl", "summary.json", "curves.png",
                 "samples.jsonl", "pretrain_metrics.jsonl", "hf_model/config.json",
                 "hf_model/model.safetensors"):
        assert (d / name).exists(), name
    # every=1: step_1 during the run, step_2 the final one
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["step_1", "step_2"]
    rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for k in ("pass_at_1_before", "pass_at_1_after", "format_rate_before", "format_rate_after",
              "wall_s"):
        assert k in summary
    assert json.loads((d / "config.json").read_text())["steps"] == 2


def test_cli_overrides_are_typed(tmp_path, capsys):
    import tyro

    base = load_experiment(ROOT / "experiments" / "tiny_r1_zero.py")
    exp = tyro.cli(Experiment, default=base, args=["--grpo.kl_coef", "0.0", "--steps", "5",
                                                   "--run-dir", str(tmp_path)],
                   config=(tyro.conf.FlagConversionOff, tyro.conf.AvoidSubcommands))
    assert exp.grpo.kl_coef == 0.0 and exp.steps == 5 and exp.run_dir == str(tmp_path)
    assert exp.grpo.group_size == base.grpo.group_size
    with pytest.raises(SystemExit):
        tyro.cli(Experiment, default=base, args=["--steps", "five"],
                 config=(tyro.conf.FlagConversionOff, tyro.conf.AvoidSubcommands))


def test_runs_are_deterministic_for_a_seed(tmp_path):
    exp = load_experiment(ROOT / "experiments" / "tiny_r1_zero.py")
    exp = dataclasses.replace(
        exp, steps=2, prompts_per_step=4, pretrain=PretrainConfig(steps=3, batch_size=8),
        data=dataclasses.replace(exp.data, eval_problems=8),
        eval=dataclasses.replace(exp.eval, samples=2, batch_prompts=8),
        log=dataclasses.replace(exp.log, progress=False, tensorboard=False))
    timing = ("_s", "tokens_per_s", "wall_s", "run_dir")
    results = []
    for name in ("a", "b"):
        summary = run(dataclasses.replace(exp, run_dir=str(tmp_path / name)), name=name)
        rows = [json.loads(l) for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        rows = [{k: v for k, v in r.items() if not k.endswith(timing)} for r in rows]
        results.append((rows, {k: v for k, v in summary.items() if not k.endswith(timing)}))
    assert results[0] == results[1]
    assert len(results[0][0]) == 2 and "kl" in results[0][0][0]


@pytest.mark.parametrize("grpo", [
    GRPOConfig(group_size=4, kl_coef=0.0, ratio_level="sequence", eps_low=3e-4, eps_high=4e-4),
    GRPOConfig(group_size=4, kl_coef=0.01, kl_estimator="k1", adv_norm="none",
               aggregation="seq_mean_token_sum_norm"),
    GRPOConfig(group_size=4, kl_coef=0.0, adv_norm="rloo", aggregation="token_mean",
               eps_high=0.28, mask_truncated=True, overlong_cache=4, zero_std="dynamic"),
    GRPOConfig(group_size=4, kl_coef=0.04, kl_estimator="k2", adv_norm="batch_std",
               zero_std="drop", ref_refresh_every=1),
], ids=["gspo", "dr_grpo", "dapo", "batch_std_drop"])
def test_every_variant_trains_a_step(grpo):
    exp = _exp(grpo=grpo)
    tr, params = _trainer(exp)
    state = tr.init_state(jax.tree.map(jnp.array, params))
    state, dev, host = tr.step(state, params if grpo.uses_reference else None, 0)
    m = {k: float(v) for k, v in jax.device_get(dev).items()}
    assert all(np.isfinite(v) for v in m.values()), m
    assert m["grad_norm"] >= 0 and np.isfinite(host["reward"])
    if grpo.overlong_cache:  # 12 new tokens, soft zone 4: long completions get a penalty
        assert host["reward"] <= host.get("reward/accuracy", 0) + host.get("reward/format_partial", 0) + 1e-6
