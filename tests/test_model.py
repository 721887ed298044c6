"""Parity of our policy with `transformers`, and the model's own properties."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import hf_io
from grpo_jax import model as M
from grpo_jax.config import ModelConfig, RopeScaling
from hf_models import torch_logits

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
YARN_ROPE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}

# (arch, overrides): the architectures, tied and untied, plus shapes beyond the basics:
# other sizes, head counts (MHA, GQA, MQA), explicit head_dim, RoPE theta and scaling.
PARITY_CASES = [
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen2", {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 1,
               "intermediate_size": 200, "num_hidden_layers": 3, "rope_theta": 1e6}),
    ("qwen3", {"head_dim": 32}),
    ("qwen3", {"tie_word_embeddings": True, "num_attention_heads": 8, "num_key_value_heads": 8,
               "head_dim": 16}),
    ("llama", {"rope_scaling": LLAMA3_ROPE, "rope_theta": 500000.0}),
    ("llama", {"tie_word_embeddings": True, "rope_scaling": LLAMA3_ROPE, "num_key_value_heads": 4}),
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}, "attention_bias": True}),
    ("qwen3", {"attention_bias": True, "rope_theta": 1e6}),
    # YaRN (Qwen2.5 / Qwen3 long context): ramp, attention factor, and its optional settings
    ("qwen2", {"rope_scaling": YARN_ROPE}),
    ("qwen3", {"rope_scaling": YARN_ROPE | {"beta_fast": 16.0, "beta_slow": 2.0,
                                            "mscale": 1.0, "mscale_all_dim": 0.5}}),
    ("llama", {"rope_scaling": YARN_ROPE | {"attention_factor": 1.3, "truncate": False}}),
]


def _batch(seed=0, b=3, l=20, vocab=128):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, vocab, (b, l))
    mask = np.ones((b, l), np.int32)
    mask[1:, :5] = 0  # left padding of different lengths
    mask[2:, :11] = 0
    return tokens, mask


@pytest.mark.parametrize("arch,overrides", PARITY_CASES,
                         ids=[f"{a}-{i}" for i, (a, _) in enumerate(PARITY_CASES)])
def test_logits_match_transformers(hf_dir_factory, arch, overrides):
    d, hf_model = hf_dir_factory(arch, initializer_range=0.1, **overrides)
    cfg, params = hf_io.load(d)
    assert cfg.arch == arch and cfg.param_dtype == "float32"
    tokens, mask = _batch()
    ref = torch_logits(hf_model, tokens, mask)
    ours = np.asarray(M.forward(params, tokens, cfg, mask))
    real = mask.astype(bool)
    assert np.abs(ref).max() > 1.0  # logits large enough that a wrong kernel shows
    np.testing.assert_allclose(ours[real], ref[real], atol=1e-4, rtol=0)


def test_left_padding_does_not_change_real_tokens():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, attention_bias=True)
    params = M.init_params(cfg, jax.random.key(0), std=0.2)
    seq = np.arange(4, 14)[None]
    alone = M.forward(params, seq, cfg)
    padded = np.concatenate([np.full((1, 6), 0), seq], 1)
    mask = np.concatenate([np.zeros((1, 6)), np.ones((1, 10))], 1)
    with_pad = M.forward(params, padded, cfg, mask)
    np.testing.assert_allclose(with_pad[:, 6:], alone, atol=1e-5)
    # Without the mask the pads are attended to and positions shift: a different answer.
    assert np.abs(M.forward(params, padded, cfg)[:, 6:] - alone).max() > 1e-3


def test_causality():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=4, qk_norm=True, arch="qwen3")
    params = M.init_params(cfg, jax.random.key(1), std=0.2)
    a = np.arange(10, 22)[None]
    b = a.copy()
    b[0, 7:] = 5  # change the future only
    la, lb = M.forward(params, a, cfg), M.forward(params, b, cfg)
    np.testing.assert_allclose(la[:, :7], lb[:, :7], atol=1e-6)
    assert np.abs(la[:, 7:] - lb[:, 7:]).max() > 1e-3


@pytest.mark.parametrize("chunk", [3, 7, 1024])
def test_token_logprobs_equal_log_softmax(chunk):
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=2, num_kv_heads=1, tie_word_embeddings=True, logits_chunk=chunk)
    params = M.init_params(cfg, jax.random.key(2), std=0.3)
    tokens, mask = _batch(1, b=2, l=12, vocab=64)
    logps, ent = M.token_logprobs(params, tokens, cfg, mask, return_entropy=True)
    logp_all = jax.nn.log_softmax(M.forward(params, tokens, cfg, mask)[:, :-1], -1)
    want = np.take_along_axis(np.asarray(logp_all), tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(logps, want, atol=1e-5)
    np.testing.assert_allclose(ent, -(np.exp(logp_all) * logp_all).sum(-1), atol=1e-5)
    # and the gradient flows through the chunked, rematerialized path
    g = jax.grad(lambda p: M.token_logprobs(p, tokens, cfg, mask).sum())(params)
    assert float(jnp.abs(g["embed"]).sum()) > 0


def test_bf16_compute_close_to_float32():
    cfg = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=2,
                      num_heads=4, num_kv_heads=2)
    params = M.init_params(cfg, jax.random.key(3), std=0.1)
    tokens, mask = _batch(2, vocab=64)
    f32 = M.forward(params, tokens, cfg, mask)
    bf = M.forward(params, tokens, ModelConfig(**{**cfg.__dict__, "compute_dtype": "bfloat16",
                                                  "remat": True}), mask)
    assert bf.dtype == jnp.float32
    err = np.abs(np.asarray(bf) - np.asarray(f32))[mask.astype(bool)].max()
    assert 0 < err < 0.05 * np.abs(f32).max()


def test_param_axes_cover_every_weight():
    for kw in ({}, {"attention_bias": True}, {"qk_norm": True, "tie_word_embeddings": True}):
        cfg = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=2,
                          num_heads=2, num_kv_heads=1, **kw)
        shapes, axes = M.param_shapes(cfg), M.param_axes(cfg)
        flat_s = jax.tree.leaves(shapes)
        flat_a = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
        assert len(flat_s) == len(flat_a)
        assert all(len(s.shape) == len(a) for s, a in zip(flat_s, flat_a))
        assert sum(int(np.prod(s.shape)) for s in flat_s) == cfg.num_params


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_kv_heads: must divide num_heads=4"):
        ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=4,
                    num_kv_heads=3)
    with pytest.raises(ValueError, match="arch: got 'gpt2'"):
        ModelConfig(arch="gpt2", vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                    num_heads=1, num_kv_heads=1)


@pytest.mark.parametrize("kw", [{}, {"qk_norm": True, "arch": "qwen3"}, {"remat": True}])
def test_grouped_logprobs_equal_logprobs_of_concatenated_rows(kw):
    """Prompt shared across its G completions gives the same log-probs (and gradients) as the
    plain forward over [prompt; completion] rows, with left-padded prompts and ragged
    completions."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                      num_heads=4, num_kv_heads=2, attention_bias=not kw.get("qk_norm"), **kw)
    params = M.init_params(cfg, jax.random.key(4), std=0.3)
    rng = np.random.default_rng(3)
    b, g, p, t = 3, 4, 6, 5
    prompt = rng.integers(4, 64, (b, p))
    pmask = np.ones((b, p), bool)
    pmask[1, :2] = False
    pmask[2, :5] = False
    comp = rng.integers(4, 64, (b * g, t))
    cmask = np.arange(t)[None] < rng.integers(1, t + 1, (b * g, 1))
    tokens = np.concatenate([np.repeat(prompt, g, 0), comp], 1)
    attn = np.concatenate([np.repeat(pmask, g, 0), cmask], 1)

    def plain(params):
        lp, ent = M.token_logprobs(params, tokens, cfg, attn, return_entropy=True)
        return lp[:, -t:], ent[:, -t:]

    def grouped(params):
        return M.grouped_logprobs(params, prompt, pmask, comp, cmask, cfg, group_size=g,
                                  return_entropy=True)

    (lp1, e1), (lp2, e2) = plain(params), grouped(params)
    np.testing.assert_allclose(np.where(cmask, lp2, 0), np.where(cmask, lp1, 0), atol=2e-5)
    np.testing.assert_allclose(np.where(cmask, e2, 0), np.where(cmask, e1, 0), atol=2e-5)
    loss = lambda f: lambda q: jnp.sum(jnp.where(cmask, f(q)[0], 0.0))
    g1, g2 = jax.grad(loss(plain))(params), jax.grad(loss(grouped))(params)
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        scale = float(np.abs(a).max())
        assert scale > 1e-2  # gradients large enough for the comparison to mean something
        np.testing.assert_allclose(a, c, atol=2e-4 * scale)  # float32 summation order


def test_scanned_and_unrolled_layers_agree():
    base = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3,
                       num_heads=4, num_kv_heads=2, attention_bias=True)
    assert not base.use_scan and ModelConfig(**{**base.__dict__, "num_layers": 8}).use_scan
    params = M.init_params(base, jax.random.key(5), std=0.3)
    tokens, mask = _batch(4, vocab=64)
    out = {}
    for scan in (True, False):
        cfg = ModelConfig(**{**base.__dict__, "scan_layers": scan})
        f = lambda p: M.token_logprobs(p, tokens, cfg, mask)
        out[scan] = (f(params), jax.grad(lambda p: jnp.sum(f(p) * mask[:, 1:]))(params))
    np.testing.assert_allclose(out[True][0], out[False][0], atol=1e-5)
    for a, b in zip(jax.tree.leaves(out[True][1]), jax.tree.leaves(out[False][1])):
        np.testing.assert_allclose(a, b, atol=1e-4 * float(np.abs(a).max()))


@pytest.mark.parametrize("n_in,dtype,out_dtype", [(1, jnp.float32, None), (2, jnp.float32, None),
                                                  (1, jnp.bfloat16, jnp.float32)])
def test_dense_and_its_gradient_equal_the_einsum(n_in, dtype, out_dtype):
    """model.dense (a 2-D matmul with a hand-written gradient) against jnp.einsum + autodiff."""
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, 5, 4, 6)).astype(dtype)  # [B, L, H, Hd] or [B, L, ., D]
    w = jax.random.normal(kw, (4, 6, 7) if n_in == 2 else (6, 2, 7)).astype(dtype)
    spec = "blhk,hkd->bld" if n_in == 2 else "blhd,dof->blhof"
    einsum = lambda x, w: jnp.einsum(spec, x, w, preferred_element_type=out_dtype)
    ours = lambda x, w: M.dense(x, w, n_in, out_dtype)
    g = jax.random.normal(kg, einsum(x, w).shape, jnp.float32)
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(ours(x, w).astype(jnp.float32), einsum(x, w).astype(jnp.float32),
                               rtol=tol, atol=tol)
    loss = lambda f: lambda x, w: jnp.sum(f(x, w).astype(jnp.float32) * g)
    got, want = jax.grad(loss(ours), (0, 1))(x, w), jax.grad(loss(einsum), (0, 1))(x, w)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_allclose(a.astype(jnp.float32), b.astype(jnp.float32), rtol=tol, atol=tol)


FM_CONFIGS = [
    dict(arch="qwen2", attention_bias=True, tie_word_embeddings=True),
    dict(arch="qwen3", qk_norm=True, num_kv_heads=1, head_dim=12,
         rope_scaling=RopeScaling(kind="yarn", factor=4.0, original_max_position_embeddings=16)),
    dict(arch="llama", attention_bias=True, attention_out_bias=True,
         rope_scaling=RopeScaling(factor=4.0, original_max_position_embeddings=16)),
    dict(arch="llama", compute_dtype="bfloat16"),
]


def _fm_setup(kw, seed):
    cfg = ModelConfig(**{**dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                                num_heads=4, num_kv_heads=2), **kw})
    params = M.init_params(cfg, jax.random.key(seed), std=0.3)
    if cfg.attention_bias or cfg.attention_out_bias:  # init_params zeroes biases: make them count
        params["layers"] = {k: (v + 0.2 * jax.random.normal(jax.random.key(seed + 1), v.shape)
                                if k in ("bq", "bk", "bv", "bo") else v)
                            for k, v in params["layers"].items()}
    tol = 5e-2 if cfg.compute_dtype == "bfloat16" else 2e-5
    return cfg, params, tol


@pytest.mark.parametrize("kw", FM_CONFIGS)
def test_feature_major_prefill_and_decode_equal_the_row_major_ones(kw):
    """`fm_prefill` / `fm_grouped_decode` over `decode_layout` weights give the logits and cache
    of `cached_step` / `grouped_decode` (left-padded prompts, GQA, biases, q/k norms, untied and
    tied heads, RoPE scaling, bf16 compute)."""
    cfg, params, tol = _fm_setup(kw, 7)
    dw = M.decode_layout(params, cfg)
    rng = np.random.default_rng(0)
    b, g, p, t = 3, 2, 6, 4
    tokens = rng.integers(1, 64, (b, p)).astype(np.int32)
    mask = np.ones((b, p), bool)
    mask[1, :2] = mask[2, :5] = False
    logits, cache = M.cached_step(params, tokens, cfg, cache=M.init_cache(cfg, b, p), index=0,
                                  positions_BxL=M.positions_from_mask(mask), kv_mask_BxS=mask,
                                  last_only=True)
    fm_last, fm_cache = M.fm_prefill(dw, tokens, mask, cfg, cache_dtype=jnp.float32)
    np.testing.assert_allclose(fm_last, logits[:, -1], atol=tol)
    for a, c in zip(jax.tree.leaves(cache), jax.tree.leaves(fm_cache)):
        np.testing.assert_allclose(np.where(np.isfinite(a), a, 0), c, atol=tol)
    # one decode step at slot 2 of the generated-token cache, rows at different positions
    n = b * g
    gen = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype),
                       M.init_cache(cfg, n, t))
    gen_mask = np.arange(t)[None] <= 2
    step = dict(tokens_N=rng.integers(1, 64, n).astype(np.int32), cfg=cfg, prompt_cache=cache,
                gen_cache=gen, index=2, positions_N=np.repeat(mask.sum(1), g) + 2,
                prompt_mask_BxP=mask, gen_mask_NxT=np.repeat(gen_mask, n, 0))
    want, want_cache = M.grouped_decode(params, **step)
    got, got_cache = M.fm_grouped_decode(dw, **step)
    np.testing.assert_allclose(got, want, atol=tol)
    assert float(np.abs(np.asarray(want)).max()) > 0.1  # logits large enough to mean something
    for a, c in zip(jax.tree.leaves(want_cache), jax.tree.leaves(got_cache)):
        np.testing.assert_allclose(a, c, atol=tol)


def test_decode_layout_takes_stacked_or_split_layers_and_is_a_copy():
    cfg, params, _ = _fm_setup(FM_CONFIGS[0], 9)
    a, b = M.decode_layout(params, cfg), M.decode_layout(M.split_layers(params), cfg)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    lp = a["layers"][1]
    hd, h, k = cfg.hd, cfg.num_heads, cfg.num_kv_heads
    assert lp["wqkv"].shape == ((h + 2 * k) * hd, cfg.hidden_size)
    np.testing.assert_array_equal(lp["wqkv"][h * hd:(h + k) * hd],
                                  params["layers"]["wk"][1].reshape(cfg.hidden_size, -1).T)
    np.testing.assert_array_equal(lp["w_gu"][cfg.intermediate_size:],
                                  params["layers"]["w_up"][1].T)
    assert M.is_decode_layout(a) and not M.is_decode_layout(params)


def test_parity_sweep_script_draws_configs_and_compares_them(capsys):
    """scripts/parity_sweep.py (parity beyond the cases above): a short run passes, and each
    RoPE kind it can draw is one `hf_io` reads."""
    import importlib.util
    import json
    import random
    from pathlib import Path

    path = Path(__file__).parent.parent / "scripts" / "parity_sweep.py"
    spec = importlib.util.spec_from_file_location("parity_sweep", path)
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    assert sweep.main(["--configs", "3", "--seed", "5", "--rope", "yarn"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["compared"] + summary["refused_by_transformers"] == 3
    assert summary["compared"] >= 1 and summary["max_abs_diff"] < 1e-4
    rng = random.Random(0)
    kinds = {sweep.draw(rng, "any")[1].get("rope_scaling", {}).get("rope_type") for _ in range(40)}
    assert kinds == {None, "llama3", "linear", "yarn"}
