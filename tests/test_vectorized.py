"""Vectorized sweeps: a group of runs trained as one vmapped program equals its runs trained one
by one with `runner.run` (up to float32 rounding: see grpo_jax/vectorized.py)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from grpo_jax import runner
from grpo_jax.checkpoints import load_policy
from grpo_jax.config import (DataConfig, EvalConfig, Experiment, GRPOConfig, LogConfig, ModelConfig,
                             ModelSource, OptimConfig, PretrainConfig, RewardConfig, SamplerConfig)
from grpo_jax.tasks import get_task
from grpo_jax.tasks.tokenizers import char_tokenizer
from grpo_jax.vectorized import PolicyCache, Unvectorizable, VectorizedGRPO, run_group

TINY = ModelConfig(arch="qwen2", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=1,
                   num_heads=2, num_kv_heads=1, attention_bias=True, tie_word_embeddings=True)


def _exp(seed, beta, lr, eps_high, **kw):
    return Experiment(
        seed=seed, steps=3, prompts_per_step=4, model=ModelSource(init=TINY),
        pretrain=PretrainConfig(steps=2, batch_size=4, lr=1e-2),
        data=DataConfig(task="arithmetic", task_args='{"digits": [1, 1], "operators": "+"}',
                        template="short", max_prompt_tokens=32, eval_problems=4),
        sampler=SamplerConfig(max_new_tokens=10, temperature=1.0),
        grpo=GRPOConfig(group_size=4, kl_coef=beta, eps_high=eps_high, minibatches=2),
        # Adam's eps at 1e-6: with 1e-8, a weight whose gradient is ~1e-8 moves by ~lr * g / |g|,
        # so float noise of 1e-7 between two equal computations (batched or not) can move it
        # by 1e-4 (seen on the embedding rows of rarely sampled tokens).
        optim=OptimConfig(lr=lr, eps=1e-6),
        rewards=RewardConfig(weights=(("accuracy", 1.0), ("format_partial", 1.0))),
        eval=EvalConfig(samples=2, batch_prompts=4),
        log=LogConfig(progress=False, tensorboard=False, samples_every=1), **kw)


# seed, beta, lr, eps_high: a beta = 0 run beside two with a reference, two runs of one seed
# (one pretraining, one step-0 evaluation), and every vmapped hyper-parameter varying. Two
# minibatches per rollout, so that the second one's ratios move and eps_high clips.
SETTINGS = [(0, 0.04, 1e-2, 0.2), (1, 0.0, 5e-3, 0.28), (0, 0.01, 1e-2, 0.02)]
TIMING = ("rollout_s", "update_s", "step_s", "rollout_tokens_per_s", "train_tokens_per_s")
# Discrete or host-computed: equal only if the same tokens were sampled and scored.
EXACT = ("step", "reward", "reward_std", "response_length", "response_length_max", "truncated_frac",
         "zero_std_frac", "lr", "reward/accuracy", "reward/format_partial", "accuracy")


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """The same three experiments, as one vectorized group and one by one with runner.run."""
    root = tmp_path_factory.mktemp("twins")
    names = [f"seed={s},beta={b},lr={lr},eps_high={e}" for s, b, lr, e in SETTINGS]
    exps = [_exp(*s) for s in SETTINGS]
    vec = [dataclasses.replace(e, run_dir=str(root / "vec" / n)) for e, n in zip(exps, names)]
    said = []
    records = run_group(vec, names, say=said.append)
    for e, n in zip(exps, names):
        runner.run(dataclasses.replace(e, run_dir=str(root / "seq" / n)), name=n)
    return root, names, vec, records, said


def test_vectorized_runs_equal_their_sequential_twins(twins):
    """Every metrics.jsonl row, eval.jsonl row, summary and final parameter of a vectorized run
    equals its runner.run twin's: sampled tokens, rewards, learning rates and evaluations
    exactly; float metrics to 1e-5 relative (measured: ~1e-6); parameters to 1e-5 (measured:
    ~1e-6, for updates of ~lr = 1e-2: a wrong lr, beta or eps mapping misses by far more)."""
    root, names, _, records, _ = twins
    assert [r["status"] for r in records] == ["ran"] * 3
    for n in names:
        v, s = root / "vec" / n, root / "seq" / n
        vrows, srows = _rows(v / "metrics.jsonl"), _rows(s / "metrics.jsonl")
        assert [list(r) for r in vrows] == [list(r) for r in srows]  # same keys, same order
        assert [r["step"] for r in vrows] == [1, 2, 3]
        for a, b in zip(vrows, srows):
            for k in a:
                if k in EXACT:
                    assert a[k] == b[k], (n, a["step"], k)
                elif k not in TIMING:
                    np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=f"{n} {k}")
        assert _rows(v / "eval.jsonl") == _rows(s / "eval.jsonl")
        assert _rows(v / "samples.jsonl") == _rows(s / "samples.jsonl")
        assert _rows(v / "pretrain_metrics.jsonl") == _rows(s / "pretrain_metrics.jsonl")
        vsum, ssum = (json.loads((d / "summary.json").read_text()) for d in (v, s))
        assert list(vsum) == list(ssum)
        assert {k: x for k, x in vsum.items() if k not in ("wall_s", "run_dir")} == \
            {k: x for k, x in ssum.items() if k not in ("wall_s", "run_dir")}
        vw, sw = (load_file(str(d / "hf_model" / "model.safetensors")) for d in (v, s))
        assert vw.keys() == sw.keys()
        for k in vw:
            np.testing.assert_allclose(vw[k], sw[k], rtol=0, atol=1e-5, err_msg=f"{n} {k}")
        # the final checkpoint is the runner's: `grpo-jax eval/export` read it
        _, params, _, step = load_policy(v)
        assert step == 3
        np.testing.assert_array_equal(params["embed"], vw["model.embed_tokens.weight"])
    beta0 = _rows(root / "vec" / names[1] / "metrics.jsonl")
    assert all(r["kl"] == 0.0 for r in beta0)  # beta = 0: no KL, as without a reference


def test_a_seed_is_pretrained_and_evaluated_once(twins):
    _, _, _, _, said = twins
    assert sum("pretraining loss" in m for m in said) == 2  # seeds 0 and 1, not three runs
    assert sum("eval @ step 0" in m for m in said) == 3  # logged per run, computed per seed


def test_a_finished_group_is_not_run_again(twins):
    _, names, vec, _, _ = twins
    mtimes = [(Path(e.run_dir) / "summary.json").stat().st_mtime_ns for e in vec]
    records = run_group(vec, names, say=lambda m: None)
    assert [r["status"] for r in records] == ["done"] * 3
    assert [(Path(e.run_dir) / "summary.json").stat().st_mtime_ns for e in vec] == mtimes


def test_runs_of_different_shapes_are_refused(tmp_path):
    a, b = _exp(0, 0.0, 1e-2, 0.2), _exp(1, 0.0, 1e-2, 0.2)
    other = dataclasses.replace(b, grpo=dataclasses.replace(b.grpo, group_size=2), run_dir=str(tmp_path))
    with pytest.raises(Unvectorizable, match=r"grpo.group_size: 4 -> 2"):
        run_group([a, other], ["a", "b"])
    assert not any(tmp_path.iterdir())  # refused before anything was written
    task = get_task("arithmetic")
    with pytest.raises(Unvectorizable, match="sampler.max_new_tokens"):
        VectorizedGRPO([a, dataclasses.replace(b, sampler=SamplerConfig(max_new_tokens=5))], TINY,
                       char_tokenizer(tags=True), task)


def test_policy_cache_keys_on_what_the_initial_policy_depends_on():
    a = _exp(0, 0.0, 1e-2, 0.2)
    key = PolicyCache.policy_key
    assert key(a) == key(_exp(0, 0.04, 5e-3, 0.28))  # hyper-parameters: same initial policy
    assert key(a) != key(_exp(1, 0.0, 1e-2, 0.2))
    assert key(a) != key(dataclasses.replace(a, pretrain=PretrainConfig(steps=3, batch_size=4)))
    assert PolicyCache.eval_key(a) != PolicyCache.eval_key(
        dataclasses.replace(a, eval=EvalConfig(samples=3, batch_prompts=4)))


def test_a_traced_beta_is_the_static_one():
    """loss.grpo_loss with beta a traced per-run value (vmapped): beta > 0 gives the static
    beta's loss; beta = 0 the reference-free loss, gradient and kl = 0, whatever the reference."""
    import jax
    import jax.numpy as jnp

    from grpo_jax import loss as L

    rng = np.random.default_rng(0)
    logps = jnp.asarray(rng.normal(-2, 0.5, (6, 5)), jnp.float32)
    ref = jnp.asarray(rng.normal(-2, 0.5, (6, 5)), jnp.float32)
    adv, mask = jnp.asarray(rng.normal(size=6), jnp.float32), jnp.asarray(rng.random((6, 5)) > 0.3)

    def loss(lp, beta, ref):
        old = jax.lax.stop_gradient(lp)
        return L.grpo_loss(lp, old, ref, adv, mask, beta=beta)

    far = ref - 30.0  # a placeholder far from the policy: it must not leak into beta = 0
    traced = jax.jit(jax.vmap(jax.value_and_grad(lambda lp, b: loss(lp, b, far)[0]), (None, 0)))
    values, grads = traced(logps, jnp.float32([0.0, 0.04]))
    for i, (beta, r) in enumerate(((0.0, None), (0.04, far))):
        v, g = jax.value_and_grad(lambda lp: loss(lp, beta, r)[0])(logps)
        np.testing.assert_allclose(values[i], v, rtol=1e-6)
        np.testing.assert_allclose(grads[i], g, rtol=1e-5, atol=1e-7)
    assert float(values[1] - values[0]) > 0.5  # beta * k3 ~ 0.04 * 29
    metrics = jax.vmap(lambda b: loss(logps, b, ref)[1])(jnp.float32([0.0, 0.04]))
    assert float(metrics["kl"][0]) == 0.0 and float(metrics["kl"][1]) > 0
    with pytest.raises(ValueError, match="needs ref_logps"):
        jax.vmap(lambda b: loss(logps, b, None))(jnp.float32([0.0, 0.04]))


@pytest.mark.parametrize("windows", [1, 3])
def test_the_runs_rollout_is_each_runs_sampler_rollout(windows, monkeypatch):
    """`generate_runs` samples what `Sampler` samples for each run alone, also for a run whose
    prompts are left-padded beyond its own bucket (to the group's longest): same tokens,
    log-probs equal up to rounding; also when the runs decode in cache windows (8, 16, 19
    slots) and each run alone over all its slots."""
    import jax
    import jax.numpy as jnp

    from grpo_jax import model as M
    from grpo_jax import sampler as S
    from grpo_jax.sampler import Sampler, pad_prompts
    from grpo_jax.vectorized import generate_runs

    monkeypatch.setattr(S, "MIN_CACHE_WINDOW", 2)
    t = 8 if windows == 1 else 19
    scfg = SamplerConfig(max_new_tokens=t, temperature=1.0, stop_ids=tuple(range(3, 23)),
                         cache_windows=1)
    params = [M.init_params(TINY, jax.random.key(i), std=0.3) for i in range(2)]
    keys = [jax.random.key(10 + i) for i in range(2)]
    prompts = [[[5, 6, 7, 8, 9] * 2, [10, 11, 12]], [[13] * 20, [14, 15]]]  # buckets 16 and 32
    alone = [jax.device_get(Sampler(TINY, scfg)(p, *pad_prompts(q, bucket=16), k, group_size=3))
             for p, q, k in zip(params, prompts, keys)]
    padded = [pad_prompts(q, bucket=16, min_len=20) for q in prompts]
    stack = lambda xs: jax.tree.map(lambda *x: jnp.stack(x), *xs)
    cache = stack([M.init_cache(TINY, 6, t)] * 2)  # the generated tokens' slots
    runs_scfg = dataclasses.replace(scfg, cache_windows=windows)
    together, _ = jax.jit(lambda *a: generate_runs(*a, cfg=TINY, scfg=runs_scfg, group_size=3,
                                                   pad_id=0))(
        jax.vmap(M.split_layers)(stack(params)), cache, np.stack([t for t, _ in padded]),
        np.stack([m for _, m in padded]), jnp.stack(keys))
    together = jax.device_get(together)
    for r, out in enumerate(alone):
        for f in ("tokens", "mask", "lengths", "truncated"):
            np.testing.assert_array_equal(getattr(together, f)[r], getattr(out, f))
        np.testing.assert_allclose(together.logps[r], out.logps, atol=1e-5)
        np.testing.assert_allclose(together.sample_logps[r], out.sample_logps, atol=1e-5)
    lengths = np.concatenate([out.lengths for out in alone])
    assert (lengths < t).any() and (lengths > 1).any()  # rows stop at different steps
    assert windows == 1 or lengths.max() > 16  # a row decodes into the last window
