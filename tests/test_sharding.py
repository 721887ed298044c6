"""Sharding: the rules' errors, and sharded programs equal to single-device ones.

The equality checks need several devices, but this pytest process already runs jax on one CPU
device; they run in a subprocess (this file as a script) with 8 fake CPU devices, mesh
data 2 x fsdp 2 x tensor 2, and report their differences as JSON.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from grpo_jax.config import ModelConfig
from grpo_jax.sharding import (SAMPLE_RULES, TRAIN_RULES, MeshConfig, activation_sharding,
                               logical_to_spec, make_mesh, param_shardings)

# Every sharded dim divisible by 2: heads 4, kv heads 2, hidden 64, mlp 128, vocab 128.
CFG = ModelConfig(arch="qwen2", vocab_size=128, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=2, attention_bias=True,
                  scan_layers=True)


# ----------------------------------------------------------------------------- rules (in process)


def test_rules_give_fsdp_and_tensor_specs():
    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    train, sample = param_shardings(CFG, mesh, TRAIN_RULES), param_shardings(CFG, mesh, SAMPLE_RULES)
    assert train["layers"]["wq"].spec == P(None, "fsdp", "tensor")
    assert train["layers"]["w_down"].spec == P(None, "tensor", "fsdp")
    assert train["embed"].spec == P("tensor", "fsdp") and train["lm_head"].spec == P("fsdp", "tensor")
    assert train["final_norm"].spec == P()
    assert sample["layers"]["wq"].spec == P(None, None, "tensor")  # no FSDP while decoding
    assert logical_to_spec(("batch", None), TRAIN_RULES) == P(("data", "fsdp"), None)


def test_mesh_axes_missing_from_the_mesh_count_as_size_one():
    mesh = AbstractMesh((4,), ("data",))
    assert param_shardings(CFG, mesh, TRAIN_RULES)["layers"]["wq"].spec == P()
    assert activation_sharding(mesh, TRAIN_RULES, (8, 3), ("batch", None)).spec == P("data")


def test_activation_keeps_the_mesh_axes_that_divide():
    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    spec = lambda n: activation_sharding(mesh, TRAIN_RULES, (n, 5), ("batch", None)).spec
    assert spec(8) == P(("data", "fsdp"))
    assert spec(2) == P("data")  # fsdp would not divide: replicated over it
    assert spec(3) == P()


def test_collision_names_the_weight_and_both_dims():
    rules = tuple((n, "fsdp" if n == "kv_heads" else a) for n, a in TRAIN_RULES)
    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"))
    with pytest.raises(ValueError, match=r"layers\.wk: dims 1 \(embed\) and 2 \(kv_heads\) are both "
                                         r"mapped to mesh axis 'fsdp'"):
        param_shardings(CFG, mesh, rules)


def test_indivisible_dim_names_weight_axis_and_sizes():
    cfg = ModelConfig(vocab_size=128, hidden_size=56, intermediate_size=128, num_layers=1,
                      num_heads=14, num_kv_heads=2, head_dim=4)
    mesh = AbstractMesh((1, 1, 4), ("data", "fsdp", "tensor"))
    with pytest.raises(ValueError, match=r"layers\.wk dim 2 \(kv_heads=2\) is not divisible by "
                                         r"mesh axis tensor=4; change the mesh or the rule for "
                                         r"'kv_heads'"):
        param_shardings(cfg, mesh, TRAIN_RULES)
    rules = tuple((n, None if n == "kv_heads" else a) for n, a in TRAIN_RULES)
    with pytest.raises(ValueError, match=r"layers\.wo dim 1 \(q_heads=14\) is not divisible by "
                                         r"mesh axis tensor=4"):
        param_shardings(cfg, mesh, rules)
    rules = tuple((n, ("fsdp", "tensor") if n == "embed" else None) for n, _ in TRAIN_RULES)
    mesh = AbstractMesh((1, 4, 4), ("data", "fsdp", "tensor"))
    with pytest.raises(ValueError, match=r"embed dim 1 \(embed=56\) is not divisible by mesh axes "
                                         r"fsdp=4 x tensor=4 = 16"):
        param_shardings(cfg, mesh, rules)


def test_unknown_logical_axis_is_an_error():
    with pytest.raises(ValueError, match=r"logical axis 'heads' has no sharding rule"):
        logical_to_spec(("batch", "heads"), TRAIN_RULES)


def test_bad_mesh_configs():
    with pytest.raises(ValueError, match=r"mesh.axes: at most one axis may have size -1"):
        MeshConfig(axes=(("data", -1), ("tensor", -1)))
    with pytest.raises(ValueError, match=r"mesh.axes: axis names must be unique"):
        MeshConfig(axes=(("data", 2), ("data", 1)))
    with pytest.raises(ValueError, match=r"mesh.axes: size of 'tensor' must be an int >= 1 or -1"):
        MeshConfig(axes=(("data", -1), ("tensor", 0)))
    with pytest.raises(ValueError, match=r"data=2 x fsdp=2 x tensor=1 = 4 devices, but there are 8"):
        MeshConfig(axes=(("data", 2), ("fsdp", 2), ("tensor", 1))).sizes(8)
    with pytest.raises(ValueError, match=r"the fixed axes \(3 devices\) do not divide the 8 devices"):
        MeshConfig(axes=(("data", -1), ("tensor", 3))).sizes(8)
    assert MeshConfig().sizes(8) == (8, 1, 1)
    assert MeshConfig(axes=(("data", 2), ("tensor", -1))).sizes(8) == (2, 4)
    with pytest.raises(ValueError, match=r"data=2 = 2 devices, but there are 1"):
        make_mesh(MeshConfig(axes=(("data", 2),)), jax.devices()[:1])


def test_mesh_config_does_not_import_jax():
    code = "import sys; import grpo_jax.sharding as s; s.MeshConfig(); print('jax' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_use_cpu_devices_only_before_jax_starts_and_unless_fixed():
    code = ("from grpo_jax import sharding as s; n = s.use_cpu_devices(3); import jax; "
            "m = s.cpu_rollout_mesh(); print(n, jax.device_count(), m and dict(m.shape), "
            "s.use_cpu_devices(2))")
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env["JAX_PLATFORMS"] = "cpu"
    run = lambda extra: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                       env={**env, **extra}, timeout=120, check=True).stdout.split()
    # 3 devices, a 1-D data mesh over them; too late for a second call once JAX has started
    assert run({}) == ["3", "3", "{'data':", "3}", "1"]
    # the user's own device count wins: nothing changed, no rollout mesh
    assert run({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}) == ["1", "2", "None", "1"]


# ----------------------------------------------------------------------------- sharded == single


@pytest.fixture(scope="module")
def sharded_report():
    root = Path(__file__).parent.parent
    # 8 fake CPU devices; LLVM's cheap optimization level halves the compile time, and both sides
    # of every comparison are compiled with it.
    flags = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")
    env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip(),
               JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env,
                          cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_sharded_state_is_really_sharded(sharded_report):
    r = sharded_report
    assert r["devices"] == 8
    assert r["spec"]["params.layers.wq"] == str(P(None, "fsdp", "tensor"))
    assert r["spec"]["params.embed"] == str(P("tensor", "fsdp"))
    assert r["spec"]["adam_mu.layers.w_up"] == str(P(None, "fsdp", "tensor"))
    assert r["spec"]["after_update.layers.wq"] == str(P(None, "fsdp", "tensor"))
    assert r["spec"]["step"] == str(P())
    assert r["spec"]["ref_logps"] == str(P(("data", "fsdp")))
    assert r["spec"]["sample.layers.0.wq"] == str(P(None, "tensor"))  # no FSDP while decoding
    assert r["spec"]["kv_cache"] == str(P(("data", "fsdp"), "tensor"))
    assert r["spec"]["samples.tokens"] == str(P(("data", "fsdp")))
    assert r["shards"]["params.layers.wq"] == [2, 32, 2, 16]  # one device's slice


def _close(pairs: dict):
    single, sharded = (np.array([v[i] for v in pairs.values()]) for i in (0, 1))
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6, err_msg=str(list(pairs)))


def test_sharded_loss_and_gradients_equal_single_device(sharded_report):
    r = sharded_report["loss_grad"]
    assert r["loss"][0] != 0 and r["grad_norm"] > 0
    _close({"loss": r["loss"]})
    assert r["grad_rel"] < 1e-5  # max |g8 - g1| / max |g1|, the worst weight


def test_sharded_update_equals_single_device(sharded_report):
    r = sharded_report["update"]
    assert r["params_moved"] > 1e-4  # the update did something (lr 1e-2)...
    assert r["params_max_abs_diff"] < 1e-6  # ...and the same thing, to 1e-7-sized float32 ulps
    _close(r["metrics"])


def test_sharded_sampler_equals_single_device(sharded_report):
    r = sharded_report["sample"]
    assert r["tokens_equal"] and r["lengths_equal"] and r["mask_equal"]
    assert r["generated"] > 10
    assert r["logps_max_abs_diff"] < 1e-5 * max(r["logps_max_abs"], 1.0)


def test_sharded_trainer_step_equals_single_device(sharded_report):
    r = sharded_report["step"]
    assert r["host_equal"], r["host_diff"]  # same completions, hence same rewards
    _close(r["metrics"])
    assert r["params_max_abs_diff"] < 1e-6
    assert r["no_recompile"], r["compiled"]


def test_rollouts_one_program_per_device_equal_single_device(sharded_report):
    """A data-only mesh (weights replicated) decodes each shard's rows as its own program, each
    with its own early exit; the tokens are those of one device, and a trainer that trains on
    one device and samples on that mesh takes the same steps. The weights from one CPU device
    are shared by the mesh's devices (one copy in memory), and stay valid without the source."""
    r = sharded_report["per_shard"]
    assert r["used"] and r["tokens_spec"] == str(P("data"))
    # feature-major on the CPU by default where every device holds the weights; the row-major
    # decode over the same mesh gives the same tokens
    assert r["feature_major"] == [True, True, True, False, False]
    assert r["row_tokens_equal"] and r["row_logps_max_abs_diff"] < 1e-5
    assert "feature_major=True needs every weight replicated" in r["tp_error"]
    # the tensor-parallel decode in cache windows: the same tokens
    assert r["tp_windows"] == [8, 12] and r["tp_windows_tokens_equal"]
    assert r["tp_windows_logps_max_abs_diff"] < 1e-5
    assert r["shares_weights"] and r["shared_pointers"] == 1 and r["shared_values_ok"]
    assert r["shared_devices"] == [0, 1, 2, 3]
    assert r["tokens_equal"] and r["mask_equal"]
    assert min(r["lengths"]) < 12 and max(r["lengths"]) > 1  # stop ids ended some rows early
    assert r["logps_max_abs_diff"] < 1e-5 and r["sample_logps_max_abs_diff"] < 1e-5
    assert r["step_host_equal"]
    _close(r["step_metrics"])
    assert r["step_params_max_abs_diff"] < 1e-6


# ----------------------------------------------------------------------------- the subprocess


def _report() -> dict:
    """Run every sharded program next to its single-device twin; differences as JSON."""
    import time

    import jax.numpy as jnp

    from grpo_jax import model as M
    from grpo_jax import sharding as S
    from grpo_jax.config import (DataConfig, Experiment, GRPOConfig, LogConfig, ModelSource,
                                 OptimConfig, RewardConfig, SamplerConfig)
    from grpo_jax.sampler import pad_prompts
    from grpo_jax.tasks import get_task
    from grpo_jax.tasks.templates import format_prompt
    from grpo_jax.tasks.tokenizers import char_tokenizer
    from grpo_jax.trainer import GRPOTrainer, prompt_ids

    t_start = time.perf_counter()
    mesh = S.make_mesh(MeshConfig(axes=(("data", 2), ("fsdp", 2), ("tensor", 2))))
    exp = Experiment(
        seed=0, steps=2, prompts_per_step=8, model=ModelSource(init=CFG),
        data=DataConfig(task="arithmetic", task_args='{"digits": [1, 1], "operators": "+"}',
                        template="short", max_prompt_tokens=32),
        sampler=SamplerConfig(max_new_tokens=12, temperature=1.0, top_p=0.95),
        grpo=GRPOConfig(group_size=4, kl_coef=0.04, minibatches=2),
        # Adam's eps = 1: the step is ~lr * g, smooth in g. With eps = 1e-8 it is ~lr * sign(g),
        # and float32 reduction-order noise on near-zero gradients flips whole lr-sized steps.
        optim=OptimConfig(lr=1e-2, micro_batches=2, eps=1.0),
        rewards=RewardConfig(weights=(("accuracy", 1.0), ("format_partial", 1.0))),
        log=LogConfig(progress=False, tensorboard=False))
    tok, task = char_tokenizer(tags=True), get_task("arithmetic", digits=[1, 1], operators="+")
    host_params = jax.device_get(M.init_params(CFG, jax.random.key(0), std=0.2))
    single = GRPOTrainer(exp, CFG, tok, task)
    sharded = GRPOTrainer(exp, CFG, tok, task, mesh=mesh)
    diff = lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b))))
    rel = lambda a, b: diff(a, b) / max(float(np.max(np.abs(np.asarray(b)))), 1e-30)
    tree_max = lambda f, a, b: max(jax.tree.leaves(jax.tree.map(f, a, b)))
    spec, shards, report = {}, {}, {"devices": jax.device_count()}

    # A group-major batch shaped as step 0's (B = 8 prompts of its bucketed length, G = 4,
    # T = 12), so that the steps below reuse the compiled programs.
    examples = task.train(8, seed=exp.seed * 1_000_003)
    ids = prompt_ids(tok, [format_prompt(ex, "short", tok) for ex in examples], examples, 32)
    prompt, prompt_mask = pad_prompts(ids, bucket=exp.sampler.prompt_bucket, pad_id=tok.pad_token_id)
    rng = np.random.default_rng(0)
    b, g, t = 8, 4, 12
    gen = np.arange(t)[None, None] < rng.integers(1, t + 1, (b, g))[..., None]
    batch = dict(prompt=prompt, prompt_mask=prompt_mask,
                 comp=rng.integers(4, 90, (b, g, t)).astype(np.int32), gen_mask=gen, loss_mask=gen,
                 adv=rng.normal(size=(b, g)).astype(np.float32),
                 sampler_logps=np.zeros((b, g, t), np.float32))
    sbatch = S.place(batch, sharded.batch_sharding)
    ref_params = sharded.place_params(host_params)
    batch["ref_logps"] = batch["old_logps"] = single._score(host_params, batch)
    sbatch["ref_logps"] = sbatch["old_logps"] = sharded._score(ref_params, sbatch)
    spec["ref_logps"] = str(sbatch["ref_logps"].sharding.spec)

    # 1. The loss and its gradient.
    vg = jax.value_and_grad(single._loss_fn, has_aux=True)
    (l1, _), g1 = jax.jit(vg)(host_params, batch, 1.0)
    vg8 = jax.value_and_grad(sharded._loss_fn, has_aux=True)
    (l8, _), g8 = jax.jit(S.under_rules(vg8, mesh, S.TRAIN_RULES))(ref_params, sbatch, 1.0)
    report["loss_grad"] = dict(loss=(float(l1), float(l8)), grad_rel=tree_max(rel, g8, g1),
                               grad_norm=float(np.sqrt(sum(np.sum(np.square(x))
                                                           for x in jax.tree.leaves(g1)))))

    # 2. One `_update` (2 minibatches x 2 micro-batches, shuffled), from sharded state.
    state1 = single.init_state(jax.tree.map(jnp.array, host_params))
    state8 = sharded.init_state(host_params)
    spec["params.layers.wq"] = str(state8.params["layers"]["wq"].sharding.spec)
    spec["params.embed"] = str(state8.params["embed"].sharding.spec)
    spec["adam_mu.layers.w_up"] = str(state8.opt_state[1][0].mu["layers"]["w_up"].sharding.spec)
    spec["step"] = str(state8.step.sharding.spec)
    shards["params.layers.wq"] = list(state8.params["layers"]["wq"].addressable_shards[0].data.shape)
    key = jax.random.key(3)
    new1, m1 = single._update(state1, batch, key)
    new8, m8 = sharded._update(state8, sbatch, key)
    spec["after_update.layers.wq"] = str(new8.params["layers"]["wq"].sharding.spec)
    report["update"] = dict(params_moved=tree_max(diff, new1.params, host_params),
                            params_max_abs_diff=tree_max(diff, new8.params, new1.params),
                            metrics={k: (float(m1[k]), float(m8[k])) for k in m1})

    # 3. Sampling from the updated params: the sharded rollout reshards them from the training
    # layout (FSDP) to the decoding one.
    k = jax.random.key(7)
    out8 = sharded.sampler(new8.params, prompt, prompt_mask, k, group_size=4)
    s1 = jax.device_get(single.sampler(new1.params, prompt, prompt_mask, k, group_size=4))
    spec["samples.tokens"] = str(out8.tokens.sharding.spec)
    spec["kv_cache"] = str(sharded.sampler._cache["k"][0].sharding.spec)
    spec["sample.layers.0.wq"] = str(
        sharded.sampler._split(new8.params)["layers"][0]["wq"].sharding.spec)
    s8 = jax.device_get(out8)
    report["sample"] = dict(tokens_equal=bool((s8.tokens == s1.tokens).all()),
                            lengths_equal=bool((s8.lengths == s1.lengths).all()),
                            mask_equal=bool((s8.mask == s1.mask).all()),
                            generated=int(s1.lengths.sum()), logps_max_abs_diff=diff(s8.logps, s1.logps),
                            logps_max_abs=float(np.abs(s1.logps).max()))

    # 4. Whole GRPO steps (rollout, rewards, score, update); the second one compiles nothing.
    st1, st8 = new1, new8
    host_diff, sizes = {}, None
    for step in range(2):
        st1, d1, h1 = single.step(st1, host_params, step)
        st8, d8, h8 = sharded.step(st8, ref_params, step)
        sizes = sizes or (sharded._update._cache_size(), sharded._score._cache_size(),
                          sharded.sampler.cache_size())
        h1, h8 = ({k: v for k, v in h.items() if not k.endswith(("_s", "_per_s"))} for h in (h1, h8))
        host_diff.update({k: (h1[k], h8.get(k)) for k in h1 if h1[k] != h8.get(k)})
        d1, d8 = jax.device_get((d1, d8))
    report["step"] = dict(host_equal=not host_diff, host_diff=str(host_diff),
                          metrics={k: (float(d1[k]), float(d8[k])) for k in d1},
                          params_max_abs_diff=tree_max(diff, st8.params, st1.params),
                          no_recompile=sizes == (sharded._update._cache_size(),
                                                 sharded._score._cache_size(),
                                                 sharded.sampler.cache_size()),
                          compiled=sizes)

    # 5. Rollouts over a 1-D data mesh of 4 devices (weights replicated: one decode program per
    # device, as `cpu_rollout_mesh` gives), with the training on one device.
    from grpo_jax.sampler import Sampler

    data4 = S.make_mesh(MeshConfig(axes=(("data", 4),)), jax.devices()[:4])
    scfg = SamplerConfig(max_new_tokens=12, temperature=0.8, top_k=20, top_p=0.9,
                         stop_ids=(tok.eos_token_id, tok.encode(">")[0]), prompt_bucket=32)
    per_shard = Sampler(CFG, scfg, pad_id=tok.pad_token_id, mesh=data4)
    one = Sampler(CFG, scfg, pad_id=tok.pad_token_id)
    a = jax.device_get(one(st1.params, prompt, prompt_mask, k, group_size=4))
    b4 = per_shard(st1.params, prompt, prompt_mask, k, group_size=4)  # params from one device
    b4_spec, b4 = str(b4.tokens.sharding.spec), jax.device_get(b4)
    row4 = Sampler(CFG, scfg, pad_id=tok.pad_token_id, mesh=data4, feature_major=False)
    r4 = jax.device_get(row4(st1.params, prompt, prompt_mask, k, group_size=4))
    try:  # weights split over a tensor axis: no feature-major decode
        tp = S.make_mesh(MeshConfig(axes=(("data", 2), ("tensor", 2))), jax.devices()[:4])
        Sampler(CFG, scfg, mesh=tp, feature_major=True)
        tp_error = None
    except ValueError as e:
        tp_error = str(e)
    # The tensor-parallel decode in cache windows of 8 and 12 slots (one GSPMD program).
    import grpo_jax.sampler as sampler_module

    sampler_module.MIN_CACHE_WINDOW = 2
    win_cfg = dataclasses.replace(scfg, cache_windows=3)
    windows = sampler_module.cache_windows(12, 3)
    w = jax.device_get(Sampler(CFG, win_cfg, pad_id=tok.pad_token_id, mesh=tp)(
        st1.params, prompt, prompt_mask, k, group_size=4))
    sampler_module.MIN_CACHE_WINDOW = 64
    hybrid = GRPOTrainer(exp, CFG, tok, task, sample_mesh=data4)
    sh, sd = st1, jax.tree.map(jnp.copy, st1)  # each trainer donates its own
    for step in range(2, 4):
        sd, d1, h1 = single.step(sd, host_params, step)
        sh, dh, hh = hybrid.step(sh, host_params, step)
    d1, dh = jax.device_get((d1, dh))
    h1, hh = ({k: v for k, v in h.items() if not k.endswith(("_s", "_per_s"))} for h in (h1, hh))
    # The weights from one device are shared with the others, not copied (and outlive the source).
    src = jax.device_put(np.arange(12, dtype=np.float32).reshape(3, 4), jax.devices()[0]) + 1
    shared = S.share_replicated({"w": src}, {"w": NamedSharding(data4, P())})["w"]
    del src
    churn = [jnp.full((3, 4), 7.0) + i for i in range(50)]  # would reuse freed memory
    report["per_shard"] = dict(
        used=per_shard._per_shard is not None and hybrid.sampler._per_shard is not None,
        feature_major=(per_shard.feature_major, one.feature_major, hybrid.sampler.feature_major,
                       row4.feature_major, Sampler(CFG, scfg, mesh=tp).feature_major),
        row_tokens_equal=bool((a.tokens == r4.tokens).all()),
        row_logps_max_abs_diff=diff(r4.logps, a.logps), tp_error=tp_error,
        tp_windows=list(windows), tp_windows_tokens_equal=bool((w.tokens == a.tokens).all()),
        tp_windows_logps_max_abs_diff=diff(w.logps, a.logps),
        shares_weights=per_shard._share and hybrid.sampler._share,
        shared_pointers=len({x.data.unsafe_buffer_pointer() for x in shared.addressable_shards}),
        shared_devices=sorted(d.id for d in shared.devices()), churn=len(churn),
        shared_values_ok=bool((np.asarray(shared) == np.arange(12).reshape(3, 4) + 1).all()),
        tokens_equal=bool((a.tokens == b4.tokens).all()), mask_equal=bool((a.mask == b4.mask).all()),
        lengths=[int(x) for x in a.lengths], logps_max_abs_diff=diff(b4.logps, a.logps),
        sample_logps_max_abs_diff=diff(b4.sample_logps, a.sample_logps), tokens_spec=b4_spec,
        step_host_equal=h1 == hh, step_metrics={k: (float(d1[k]), float(dh[k])) for k in d1},
        step_params_max_abs_diff=tree_max(diff, sh.params, sd.params))
    report.update(spec=spec, shards=shards, wall_s=time.perf_counter() - t_start)
    return report


if __name__ == "__main__":
    print(json.dumps(_report()))
