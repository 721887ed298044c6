"""The KV-cache sampler: exactness against full forwards, the sampling distributions, stopping,
padding, and compilation reuse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import model as M
from grpo_jax import sampler as S
from grpo_jax.config import ModelConfig, SamplerConfig

CFG = ModelConfig(arch="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, attention_bias=True)
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [20]]


@pytest.fixture(scope="module")
def params():
    return M.init_params(CFG, jax.random.key(0), std=0.3)


@pytest.mark.parametrize("feature_major", [False, True])
def test_cached_greedy_equals_argmax_of_full_forward(params, feature_major):
    scfg = SamplerConfig(max_new_tokens=10, temperature=0.0, prompt_bucket=8)
    sampler = S.Sampler(CFG, scfg, feature_major=feature_major)
    assert sampler.feature_major == feature_major
    out = sampler(params, *S.pad_prompts(PROMPTS, bucket=8), jax.random.key(1), group_size=2)
    assert out.tokens.shape == (6, 10) and bool(out.mask.all())
    for r in range(6):
        seq = np.array([PROMPTS[r // 2] + list(np.asarray(out.tokens[r]))])
        logits = M.forward(params, seq, CFG)[0, len(PROMPTS[r // 2]) - 1:-1]
        np.testing.assert_array_equal(np.argmax(logits, -1), out.tokens[r])
        logp = jax.nn.log_softmax(logits, -1)
        np.testing.assert_allclose(np.take_along_axis(logp, out.tokens[r][:, None], -1)[:, 0],
                                   out.logps[r], atol=1e-4)
    np.testing.assert_array_equal(out.sample_logps, 0.0)


def test_sampled_logps_match_full_forward_at_temperature(params):
    scfg = SamplerConfig(max_new_tokens=6, temperature=0.7, top_k=20, prompt_bucket=4)
    out = S.generate(params, CFG, scfg, PROMPTS[:2], jax.random.key(3), group_size=3)
    for r in range(6):
        seq = np.array([PROMPTS[r // 3] + list(np.asarray(out.tokens[r]))])
        logits = M.forward(params, seq, CFG)[0, len(PROMPTS[r // 3]) - 1:-1]
        tok = np.asarray(out.tokens[r])[:, None]
        want = np.take_along_axis(jax.nn.log_softmax(logits, -1), tok, -1)[:, 0]
        np.testing.assert_allclose(out.logps[r], want, atol=1e-4)
        filt = S.filter_logits(logits, scfg)
        want_s = np.take_along_axis(jax.nn.log_softmax(filt, -1), tok, -1)[:, 0]
        np.testing.assert_allclose(out.sample_logps[r], want_s, atol=1e-4)


def _expected(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The intended distribution, written independently with numpy and a sort."""
    x = np.asarray(logits, np.float64) / temperature
    p = np.exp(x - x.max())
    p /= p.sum()
    order = np.argsort(-p)
    keep = np.zeros_like(p, bool)
    mass = 0.0
    for rank, i in enumerate(order):
        if (top_k and rank >= top_k) or mass >= top_p:
            break
        keep[i] = True
        mass += p[i]
    q = np.where(keep, p, 0)
    return q / q.sum()


@pytest.mark.parametrize("settings", [
    dict(temperature=1.0), dict(temperature=0.5), dict(temperature=2.0, top_k=3),
    dict(temperature=1.0, top_p=0.6), dict(temperature=0.8, top_k=4, top_p=0.9),
])
def test_token_frequencies_match_the_intended_distribution(settings):
    # probs at T=1 ~ [.4, .3, .2, .1, ~0 ...]: top_p=0.6 must keep exactly the first two
    # (a "cumsum <= p" rule keeps one), top_k=3 the first three.
    logits = jnp.log(jnp.array([0.4, 0.3, 0.2, 0.1, 1e-3, 1e-3, 1e-3, 1e-3]))
    n = 40_000
    scfg = SamplerConfig(**settings)
    tok, _, slp = S.sample_token(jnp.tile(logits, (n, 1)), jax.random.key(7), scfg)
    freq = np.bincount(np.asarray(tok), minlength=8) / n
    want = _expected(logits, **settings)
    # 40k draws: the standard error of a frequency is <= 0.0025, so 0.01 is 4 sigma.
    np.testing.assert_allclose(freq, want, atol=0.01)
    assert freq[want == 0].sum() == 0
    np.testing.assert_allclose(np.exp(np.asarray(slp)), want[np.asarray(tok)], rtol=1e-4)


def test_first_token_distribution_end_to_end(params):
    """Through prefill and the group cache copy: G rows sample the temperature-scaled softmax."""
    scfg = SamplerConfig(max_new_tokens=1, temperature=1.5, prompt_bucket=16)
    g = 4000
    out = S.generate(params, CFG, scfg, [PROMPTS[1]], jax.random.key(11), group_size=g)
    logits = M.forward(params, np.array([PROMPTS[1]]), CFG)[0, -1]
    want = _expected(logits, temperature=1.5)
    freq = np.bincount(np.asarray(out.tokens[:, 0]), minlength=CFG.vocab_size) / g
    assert np.abs(freq - want).max() < 0.03  # 4000 draws, probabilities < 0.2: 4 sigma ~ 0.025


def test_stop_ids_finish_rows_and_pad_after(params):
    greedy = SamplerConfig(max_new_tokens=8, temperature=0.0, prompt_bucket=8)
    free = S.generate(params, CFG, greedy, PROMPTS, jax.random.key(0))
    stop = int(free.tokens[0, 2])  # row 0 emits this third; other rows may meet it elsewhere
    scfg = SamplerConfig(max_new_tokens=8, temperature=0.0, prompt_bucket=8, stop_ids=(stop,))
    out = S.generate(params, CFG, scfg, PROMPTS, jax.random.key(0), pad_id=63)
    for r in range(3):
        toks = list(np.asarray(free.tokens[r]))
        n = toks.index(stop) + 1 if stop in toks else 8
        assert int(out.lengths[r]) == n
        np.testing.assert_array_equal(out.tokens[r, :n], free.tokens[r, :n])
        assert bool(out.mask[r, :n].all()) and not bool(out.mask[r, n:].any())
        assert (np.asarray(out.tokens[r, n:]) == 63).all()
        assert (np.asarray(out.logps[r, n:]) == 0).all()
        assert bool(out.truncated[r]) == (stop not in toks)
    assert int(out.lengths[0]) == 3


def test_every_row_stops_at_once_exits_early(params):
    scfg = SamplerConfig(max_new_tokens=50, temperature=1.0, prompt_bucket=8,
                         stop_ids=tuple(range(CFG.vocab_size)))
    out = S.generate(params, CFG, scfg, PROMPTS, jax.random.key(0))
    np.testing.assert_array_equal(out.lengths, 1)
    assert not bool(out.truncated.any())


def test_padding_rows_do_not_change_a_prompt_continuation(params):
    scfg = SamplerConfig(max_new_tokens=6, temperature=0.0, prompt_bucket=1)
    alone = S.generate(params, CFG, scfg, [PROMPTS[2]], jax.random.key(0))
    scfg16 = SamplerConfig(max_new_tokens=6, temperature=0.0, prompt_bucket=16)
    batched = S.generate(params, CFG, scfg16, PROMPTS, jax.random.key(0))
    np.testing.assert_array_equal(alone.tokens[0], batched.tokens[2])
    np.testing.assert_allclose(alone.logps[0], batched.logps[2], atol=1e-5)


def test_group_rows_sample_independently_and_keys_matter(params):
    scfg = SamplerConfig(max_new_tokens=8, temperature=1.0, prompt_bucket=8)
    a = S.generate(params, CFG, scfg, PROMPTS, jax.random.key(0), group_size=4)
    b = S.generate(params, CFG, scfg, PROMPTS, jax.random.key(0), group_size=4)
    c = S.generate(params, CFG, scfg, PROMPTS, jax.random.key(1), group_size=4)
    np.testing.assert_array_equal(a.tokens, b.tokens)  # same key, same samples
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    rows = {tuple(np.asarray(a.tokens[i])) for i in range(4)}
    assert len(rows) > 1  # the 4 rows of prompt 0 are not copies of one another


def test_same_bucket_does_not_recompile(params):
    scfg = SamplerConfig(max_new_tokens=5, temperature=1.0, prompt_bucket=16)
    sampler = S.Sampler(CFG, scfg)
    sizes = []
    for i, prompts in enumerate([PROMPTS, [[1, 2], [3] * 12, [4, 5, 6]], [[9] * 16, [8], [7]]]):
        tokens, mask = S.pad_prompts(prompts, bucket=16)
        sampler(params, tokens, mask, jax.random.key(i), group_size=2)
        sizes.append(sampler.cache_size())
    assert sizes[1] == sizes[0] and sizes[2] == sizes[0]
    tokens, mask = S.pad_prompts([[1] * 17, [2], [3]], bucket=16)  # the next bucket: one more
    sampler(params, tokens, mask, jax.random.key(9), group_size=2)
    assert sampler.cache_size() == sizes[0] + 1


def test_cache_fits_reads_rows_and_slots_with_any_leading_dims():
    c = M.init_cache(CFG, 6, 8)
    assert M.cache_fits(c, 6, 8)
    assert not M.cache_fits(c, 6, 9) and not M.cache_fits(c, 8, 6) and not M.cache_fits(None, 6, 8)
    runs = jax.tree.map(lambda x: jnp.stack([x] * 3), c)  # `vectorized`: a leading runs axis
    assert M.cache_fits(runs, 6, 8) and not M.cache_fits(runs, 3, 8)


def test_missing_key_and_bad_settings_are_errors(params):
    sampler = S.Sampler(CFG, SamplerConfig(max_new_tokens=2))
    tokens, mask = S.pad_prompts(PROMPTS, bucket=4)
    with pytest.raises(ValueError, match="PRNG key is required"):
        sampler(params, tokens, mask, None)
    with pytest.raises(ValueError, match="top_p: must be in"):
        SamplerConfig(top_p=0.0)
    with pytest.raises(ValueError, match="every prompt needs at least one token"):
        S.pad_prompts([[1], []], bucket=4)


@pytest.mark.parametrize("flat", [False, True])
def test_top_p_over_a_large_vocabulary_is_exact(flat):
    """Past 1024 tokens the nucleus is searched among the top 1024 first; a flat distribution
    whose nucleus is larger takes the full-sort branch. Both must keep exactly the nucleus."""
    rng = np.random.default_rng(0)
    v = 3000
    logits = rng.normal(0, 0.05 if flat else 3.0, (2, v)).astype(np.float32)
    scfg = SamplerConfig(temperature=1.0, top_p=0.9)
    kept = np.isfinite(np.asarray(S.filter_logits(jnp.asarray(logits), scfg)))
    for r in range(2):
        want = _expected(logits[r], top_p=0.9) > 0
        np.testing.assert_array_equal(kept[r], want)
    assert (kept.sum(-1) > 1024).all() == flat


def test_grouped_attention_equals_attention_over_each_rows_full_cache():
    """The prompt's keys kept once per group give what each row attending over its own copy of
    them would: 3 prompts x G=4 rows, GQA (4 query heads on 2 kv heads), left-padded prompts
    and rows that have written different numbers of tokens."""
    b, g, kv, h, hd, p, t = 3, 4, 2, 4, 8, 5, 6
    n = b * g
    ks = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(ks[0], (n, h, hd))
    pk, pv = jax.random.normal(ks[1], (b, kv, p, hd)), jax.random.normal(ks[2], (b, kv, p, hd))
    gk, gv = jax.random.normal(ks[3], (n, kv, t, hd)), jax.random.normal(ks[4], (n, kv, t, hd))
    prompt_mask = np.arange(p)[None] >= np.array([0, 2, 4])[:, None]  # left padding
    gen_mask = np.arange(t)[None] < (np.arange(n) % t + 1)[:, None]  # 1 .. t tokens written
    allowed = np.concatenate([np.repeat(prompt_mask, g, 0), gen_mask], 1)
    got = M.grouped_attention(q, pk.swapaxes(2, 3), pv, gk.swapaxes(2, 3), gv, allowed)
    rep = lambda x: jnp.repeat(x, g, axis=0)
    want = M.attention(q[:, None], jnp.concatenate([rep(pk), gk], 2),
                       jnp.concatenate([rep(pv), gv], 2), allowed[:, None])[:, 0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_noise_of_a_shard_is_its_rows_of_the_whole_batch():
    """A device draws the Gumbel noise of its own rows only, and it is the noise one device
    holding the whole batch draws for them; the decode's noise drawn up front is each step's."""
    key = jax.random.key(4)
    whole = S.row_noise(key, 8, 16)
    np.testing.assert_array_equal(S.row_noise(key, 3, 16, offset=5), whole[5:])
    steps = S.decode_noise(key, 4, 3, 16, offset=2)
    for t in range(4):
        np.testing.assert_array_equal(steps[t], S.row_noise(jax.random.fold_in(key, t), 8, 16)[2:5])
    assert S.decode_noise(key, 10**4, 10**3, 10**3) is None  # over the budget: drawn per step


def test_first_argmax_is_argmax_with_ties_and_nans():
    x = jnp.array([[1.0, 3.0, 3.0, 0.0], [-jnp.inf, -1.0, -jnp.inf, -1.0],
                   [0.0, jnp.nan, 5.0, jnp.nan], [2.0, 2.0, 2.0, 2.0]])
    np.testing.assert_array_equal(S.first_argmax(x), jnp.argmax(x, -1))
    np.testing.assert_array_equal(S.first_argmax(x), [1, 1, 1, 0])


def test_feature_major_sampler_equals_row_major_and_keeps_its_layout(params):
    """On the CPU the sampler decodes from `decode_layout(params)` by default: the same tokens
    and log-probs as the row-major decode (top-k, top-p, stop ids, groups). The layout is made
    once per set of weights: kept while the same arrays come back, made again for new or
    deleted ones, never kept for numpy arrays (they can change in place)."""
    scfg = SamplerConfig(max_new_tokens=7, temperature=0.9, top_k=30, top_p=0.95, stop_ids=(3,),
                         prompt_bucket=4)
    fm, row = S.Sampler(CFG, scfg), S.Sampler(CFG, scfg, feature_major=False)
    assert fm.feature_major and not row.feature_major  # the CPU default
    batch = S.pad_prompts(PROMPTS, bucket=4)
    for i in range(2):
        a, b = (s(params, *batch, jax.random.key(i), group_size=3) for s in (fm, row))
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_allclose(a.logps, b.logps, atol=1e-5)
        np.testing.assert_allclose(a.sample_logps, b.sample_logps, atol=1e-5)
    assert bool((a.tokens == 3).any()) and not bool(a.mask.all())  # a stop id was drawn
    kept = fm._kept[1]
    fm(params, *batch, jax.random.key(5), group_size=3)
    assert fm._kept[1] is kept  # same arrays: the layout is reused
    other = jax.tree.map(lambda x: x * 1.5, params)
    c = fm(other, *batch, jax.random.key(5), group_size=3)
    assert fm._kept[1] is not kept
    want = row(other, *batch, jax.random.key(5), group_size=3)
    np.testing.assert_array_equal(c.tokens, want.tokens)
    kept = fm._kept[1]
    jax.tree.leaves(other)[0].delete()
    again = jax.tree.map(lambda x: x * 1.5, params)  # equal values, new arrays
    fm(again, *batch, jax.random.key(5), group_size=3)
    assert fm._kept[1] is not kept
    fm(jax.device_get(params), *batch, jax.random.key(5), group_size=3)
    assert fm._kept is None


def test_cache_windows_split_the_generated_slots():
    assert S.cache_windows(32, 4) == (32,)  # below two windows of MIN_CACHE_WINDOW: one
    assert S.cache_windows(256, 4) == (64, 128, 192, 256)
    assert S.cache_windows(200, 4) == (72, 144, 200)  # multiples of 8, the last cut to t_max
    assert S.cache_windows(1000, 4) == (256, 512, 768, 1000)
    assert S.cache_windows(128, 4) == (64, 128)  # no window below MIN_CACHE_WINDOW slots
    assert S.cache_windows(1000, 1) == (1000,)
    with pytest.raises(ValueError, match="cache_windows"):
        SamplerConfig(cache_windows=0)


@pytest.mark.parametrize("feature_major", [False, True])
def test_windowed_decode_equals_one_window(params, feature_major, monkeypatch):
    """Attending over growing windows of the generated-token cache (here 8, 16 and 19 slots)
    samples what attending over all slots samples: the same tokens, log-probs equal up to
    rounding, with stop ids; the donated buffer comes back whole and is reused."""
    monkeypatch.setattr(S, "MIN_CACHE_WINDOW", 2)
    kw = dict(max_new_tokens=19, temperature=0.9, top_k=30, top_p=0.95, stop_ids=(3,),
              prompt_bucket=4)
    assert S.cache_windows(19, 3) == (8, 16, 19)
    one = S.Sampler(CFG, SamplerConfig(**kw, cache_windows=1), feature_major=feature_major)
    win = S.Sampler(CFG, SamplerConfig(**kw, cache_windows=3), feature_major=feature_major)
    batch = S.pad_prompts(PROMPTS, bucket=4)
    sizes = []
    for i in range(2):
        a, b = (s(params, *batch, jax.random.key(i), group_size=3) for s in (win, one))
        sizes.append(win.cache_size())
        np.testing.assert_array_equal(a.tokens, b.tokens)
        np.testing.assert_array_equal(a.mask, b.mask)
        np.testing.assert_allclose(a.logps, b.logps, atol=1e-5)
        np.testing.assert_allclose(a.sample_logps, b.sample_logps, atol=1e-5)
        assert jax.tree.map(lambda x: x.shape, win._cache) == jax.tree.map(
            lambda x: x.shape, S.init_cache(CFG, 9, 19))
    lengths = np.asarray(a.lengths)
    assert (lengths > 16).any() and (lengths < 19).any()  # rows live into the last window; stops
    assert sizes[1] == sizes[0]  # no recompile
    greedy = dict(kw, temperature=0.0, stop_ids=())
    a, b = (S.Sampler(CFG, SamplerConfig(**greedy, cache_windows=w), feature_major=feature_major)(
        params, *batch, jax.random.key(0)) for w in (3, 1))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logps, b.logps, atol=1e-5)
    every = dict(kw, stop_ids=tuple(range(CFG.vocab_size)))  # all rows done at once: early exit
    out = S.Sampler(CFG, SamplerConfig(**every, cache_windows=3), feature_major=feature_major)(
        params, *batch, jax.random.key(0))
    np.testing.assert_array_equal(out.lengths, 1)


def test_samplers_share_one_decoding_copy_of_the_weights(params):
    """`weights_from`: a sampler under other settings (here greedy, as an evaluation's second
    one) decodes from the first one's kept layout, made once, with the tokens of its own."""
    first = S.Sampler(CFG, SamplerConfig(max_new_tokens=5, temperature=1.0, prompt_bucket=4))
    greedy_cfg = SamplerConfig(max_new_tokens=6, temperature=0.0, prompt_bucket=4)
    greedy = S.Sampler(CFG, greedy_cfg, weights_from=first)
    batch = S.pad_prompts(PROMPTS, bucket=4)
    first(params, *batch, jax.random.key(0), group_size=2)
    kept = first._kept[1]
    out = greedy(params, *batch, jax.random.key(0))
    assert greedy._kept[1] is kept and first._kept[1] is kept  # no second copy
    alone = S.Sampler(CFG, greedy_cfg)(params, *batch, jax.random.key(0))
    np.testing.assert_array_equal(out.tokens, alone.tokens)
    other = jax.tree.map(lambda x: x * 1.5, params)
    greedy(other, *batch, jax.random.key(0))  # new weights: one new copy, for both
    assert first._kept[1] is greedy._kept[1] is not kept
    with pytest.raises(ValueError, match="weights_from"):
        S.Sampler(CFG, greedy_cfg, weights_from=first, feature_major=False)
