"""SFT on a fixed dataset (completion-only token-mean loss, bucketing, packing, epochs) and
distillation (SFT-only and logit KL)."""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import model as M
from grpo_jax.config import ModelConfig, OptimConfig
from grpo_jax.distill import distill_logits, distill_loss, distill_sft
from grpo_jax import sft
from grpo_jax.sft import (SFTConfig, assemble, bucket_lengths, encode_examples, plan_epoch,
                          train_sft_dataset)
from grpo_jax.tasks.tokenizers import char_tokenizer

CFG = ModelConfig(arch="qwen2", vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=1,
                  num_heads=2, num_kv_heads=1)
PAIRS = [("what is 3+4?", " 7"), ("2*5=", " 10"), ("hello", " world!"), ("a", " bcd"),
         ("name the colour of the sky:", " blue"), ("9-1?", " 8"), ("x", " yz"),
         ("first letter?", " a")]


# Jitted once per shape: eager op-by-op dispatch is slower than compiling on 2 cores.
completion_nll = jax.jit(sft.completion_nll, static_argnums=1, static_argnames="packed")
nll_from_hidden = jax.jit(sft.nll_from_hidden, static_argnums=1)
forward = jax.jit(M.forward, static_argnums=2)
hidden = jax.jit(M.hidden, static_argnums=2)
distill_loss = jax.jit(distill_loss, static_argnums=(1, 3),
                       static_argnames=("kl_weight", "temperature", "ce_weight"))


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer(tags=True)


def _params(seed, cfg=CFG):
    return M.init_params(cfg, jax.random.key(seed), std=0.2)


def _one_batch(tok, pairs, *, prompt_loss=False, packing="bucket", max_len=64):
    scfg = SFTConfig(batch_size=len(pairs), max_len=max_len, packing=packing, num_buckets=1)
    ex, _ = encode_examples(tok, pairs, max_len)
    lengths = [len(e.ids) for e in ex]
    buckets = bucket_lengths(lengths, num_buckets=1, multiple=16, max_len=max_len)
    (plan,) = plan_epoch(lengths, scfg, buckets, None)
    return ex, assemble(ex, plan, prompt_loss=prompt_loss)


def _hand_nll(params, tok, pairs, *, prompt_loss=False):
    """Per-example (NLL sum, count) from `model.forward` logits of the right-padded batch."""
    ids = []
    for p, c in pairs:
        pi = tok(p, add_special_tokens=False).input_ids
        ids.append((pi + tok(c, add_special_tokens=False).input_ids + [tok.eos_token_id], len(pi)))
    l = max(len(i) for i, _ in ids)
    tokens = np.zeros((len(ids), l), np.int32)
    mask = np.zeros((len(ids), l), bool)
    for r, (i, _) in enumerate(ids):
        tokens[r, :len(i)], mask[r, :len(i)] = i, True
    logp = np.asarray(jax.nn.log_softmax(forward(params, tokens, CFG, mask), -1))
    out = []
    for r, (i, pl) in enumerate(ids):
        ts = range(max(1, 0 if prompt_loss else pl), len(i))
        out.append((-sum(logp[r, t - 1, i[t]] for t in ts), len(ts)))
    return out


def test_completion_loss_equals_hand_computation(tok):
    params = _params(0)
    pairs = PAIRS[:4]
    for prompt_loss in (False, True):
        _, batch = _one_batch(tok, pairs, prompt_loss=prompt_loss)
        s, c = completion_nll(params, CFG, batch)
        per_ex = _hand_nll(params, tok, pairs, prompt_loss=prompt_loss)
        assert int(c) == sum(n for _, n in per_ex)
        np.testing.assert_allclose(float(s / c), sum(v for v, _ in per_ex) / float(c), rtol=1e-5)
    # A per-sequence mean (mean of per-example means) would differ on unequal lengths.
    per_seq = np.mean([v / n for v, n in per_ex])
    assert abs(per_seq - float(s / c)) > 1e-3


def test_prompt_targets_contribute_nothing_completion_targets_do(tok):
    params = _params(1)
    ex, batch = _one_batch(tok, PAIRS[:3])
    h = hidden(params, batch.tokens_NxL, CFG, batch.segments_NxL > 0, batch.positions_NxL)
    base = float(nll_from_hidden(params, CFG, h, batch)[0])
    # Hidden state t only feeds the logits predicting token t + 1: noise there changes only
    # those logits. Prompt targets: positions 0 .. prompt_len - 2 of row 0.
    noise = 5.0 * jax.random.normal(jax.random.key(2), h.shape)
    pl = ex[0].prompt_len
    at_prompt = h.at[0, :pl - 1].add(noise[0, :pl - 1])
    assert float(nll_from_hidden(params, CFG, at_prompt, batch)[0]) == pytest.approx(base, abs=1e-6)
    at_pad = h.at[0, len(ex[0].ids):].add(noise[0, len(ex[0].ids):])  # padding: nothing either
    assert float(nll_from_hidden(params, CFG, at_pad, batch)[0]) == pytest.approx(base, abs=1e-6)
    at_comp = h.at[0, pl - 1].add(noise[0, pl - 1])  # predicts the first completion token
    assert abs(float(nll_from_hidden(params, CFG, at_comp, batch)[0]) - base) > 1e-3
    # Changing a completion token changes the loss.
    tokens = batch.tokens_NxL.copy()
    tokens[0, pl] = (tokens[0, pl] + 1) % 90 + 4
    changed = float(completion_nll(params, CFG, batch._replace(tokens_NxL=tokens))[0])
    assert abs(changed - base) > 1e-3


def test_packed_rows_give_each_example_its_own_loss(tok):
    params = _params(3)
    _, plain = _one_batch(tok, PAIRS)
    ex, packed = _one_batch(tok, PAIRS, packing="pack", max_len=64)
    assert packed.tokens_NxL.shape[0] == len(PAIRS)  # fixed rows ...
    assert (packed.segments_NxL.max(1) >= 2).any()  # ... and several examples share a row
    assert sum(len(e.ids) for e in ex) == (packed.segments_NxL > 0).sum()
    s1, c1 = completion_nll(params, CFG, plain)
    s2, c2 = completion_nll(params, CFG, packed, packed=True)
    assert int(c1) == int(c2)
    np.testing.assert_allclose(float(s2), float(s1), rtol=1e-5)
    # Without the block-diagonal mask, examples would see each other: the loss would change.
    s3, _ = completion_nll(params, CFG, packed, packed=False)
    assert abs(float(s3) - float(s1)) > 1e-3


def test_buckets_cut_padding_on_skewed_lengths():
    rng = np.random.default_rng(0)
    lengths = list(rng.integers(5, 30, 200)) + list(rng.integers(400, 500, 8))
    scfg = SFTConfig(batch_size=8, max_len=512, num_buckets=4)
    buckets = bucket_lengths(lengths, num_buckets=4, multiple=16, max_len=512)
    assert len(buckets) <= 4 and all(b % 16 == 0 for b in buckets) and buckets[-1] >= max(lengths)
    plans = plan_epoch(lengths, scfg, buckets, np.random.default_rng(1))
    real = sum(lengths)
    slots = sum(p.length * len(p.rows) for p in plans)
    naive = 1 - real / (len(lengths) * 512)
    bucketed = 1 - real / slots
    assert bucketed < 0.5 < 0.9 < naive  # 16 and 32 for lengths 5-29: ~0.43
    for p in plans:  # every row fits its batch's length and batches hold similar lengths
        lens = [lengths[r[0]] for r in p.rows if r]
        assert max(lens) <= p.length and (p.length <= 32 or min(lens) > 100)
    assert {p.length for p in plans} == set(buckets) and all(len(p.rows) == 8 for p in plans)
    # One bucket is naive padding to the longest.
    assert bucket_lengths(lengths, num_buckets=1, multiple=16, max_len=512) == (buckets[-1],)


@pytest.mark.parametrize("packing", ["bucket", "pack"])
def test_epochs_see_each_example_once_in_a_seeded_order(packing):
    lengths = list(np.random.default_rng(0).integers(3, 60, 50))
    scfg = SFTConfig(batch_size=4, max_len=64, packing=packing, num_buckets=3)
    buckets = bucket_lengths(lengths, num_buckets=3, multiple=16, max_len=64)

    def order(seed, epoch):
        plans = plan_epoch(lengths, scfg, buckets, np.random.default_rng([seed, epoch]))
        return [i for p in plans for row in p.rows for i in row]

    for epoch in range(3):
        seen = order(0, epoch)
        assert collections.Counter(seen) == collections.Counter(range(50))
    assert order(0, 0) == order(0, 0)  # deterministic for a seed
    assert order(0, 0) != order(0, 1) and order(0, 0) != order(1, 0)
    if packing == "pack":
        plans = plan_epoch(lengths, scfg, buckets, np.random.default_rng(0))
        assert all(sum(lengths[i] for i in row) <= 64 for p in plans for row in p.rows)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="sft.packing"):
        SFTConfig(packing="zip")
    with pytest.raises(ValueError, match="sft.heldout_fraction"):
        SFTConfig(heldout_fraction=1.0)
    with pytest.raises(ValueError, match="sft.batch_size.*micro_batches"):
        SFTConfig(batch_size=6, optim=OptimConfig(micro_batches=4))


def test_sft_memorizes_a_small_set(tok):
    scfg = SFTConfig(epochs=24, batch_size=8, max_len=64, num_buckets=1, eval_every=10, seed=3,
                     optim=OptimConfig(lr=1e-2, warmup_steps=3, schedule="cosine"))
    evals = []
    res = train_sft_dataset(_params(4), CFG, tok, PAIRS, scfg, heldout_pairs=PAIRS,
                            on_eval=lambda s, l: evals.append(s))
    ex, _ = encode_examples(tok, PAIRS, 64)
    n_tokens, longest = sum(len(e.ids) for e in ex), max(len(e.ids) for e in ex)
    assert len(res.losses) == 24 and res.skipped == 0 and res.shapes == ((8, 48),) and longest > 32
    assert evals == [0, 10, 20, 24] == [s for s, _ in res.heldout]
    first, last = res.heldout[0][1], res.heldout[-1][1]
    assert last < 0.1 * first, res.heldout
    assert np.mean(res.losses[-3:]) < 0.1 * res.losses[0]
    # The held-out loss is the training objective without updates: before any update they agree.
    assert res.losses[0] == pytest.approx(first, rel=1e-5)
    assert res.tokens_seen == 24 * n_tokens
    assert res.padding_fraction == pytest.approx(1 - n_tokens / (8 * 48))


def test_an_interrupted_fit_resumes_to_the_uninterrupted_result(tok, tmp_path):
    """`Resumable`: a stop request saves the state after that update and raises `Stopped`; a
    second `fit` on the same directory finishes with the losses, held-out losses, counts and
    weights of an uninterrupted run. Saving after every update changes nothing either."""
    scfg = SFTConfig(epochs=3, batch_size=2, max_len=64, num_buckets=2, eval_every=2,
                     heldout_fraction=0.25, optim=OptimConfig(lr=1e-2, schedule="cosine",
                                                              warmup_steps=1))
    full = train_sft_dataset(_params(5), CFG, tok, PAIRS, scfg)
    assert len(full.losses) == 12 and [s for s, _ in full.heldout] == [0, 2, 4, 6, 8, 10, 12]
    checks = []
    stop_after_4 = sft.Resumable(tmp_path / "a", every_s=0,
                                 stop=lambda: checks.append(1) or len(checks) == 4)
    with pytest.raises(sft.Stopped, match="after update 4") as e:
        train_sft_dataset(_params(5), CFG, tok, PAIRS, scfg, resumable=stop_after_4)
    assert e.value.step == 4 and sft.saved_update(tmp_path / "a") == 4
    assert sft.saved_update(tmp_path / "none") is None
    seen = []
    rest = train_sft_dataset(_params(99), CFG, tok, PAIRS, scfg,  # the saved weights win
                             resumable=sft.Resumable(tmp_path / "a"),
                             progress=lambda s, l: seen.append(s))
    assert seen == list(range(5, 13))
    every = train_sft_dataset(_params(5), CFG, tok, PAIRS, scfg,
                              resumable=sft.Resumable(tmp_path / "b", every_s=1e-9))
    for res in (rest, every):
        assert res.losses == full.losses and res.heldout == full.heldout
        assert (res.tokens_seen, res.loss_tokens, res.shapes, res.padding_fraction) == (
            full.tokens_seen, full.loss_tokens, full.shapes, full.padding_fraction)
        for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(full.params)):
            np.testing.assert_array_equal(a, b)
    # a state saved for other data is refused, naming what differs and the way out
    with pytest.raises(ValueError, match=r"other data or another schedule \(examples: saved 6, "
                                         r"now 5.*delete that directory"):
        train_sft_dataset(_params(5), CFG, tok, PAIRS[:7], scfg,
                          resumable=sft.Resumable(tmp_path / "a"))


# ----------------------------------------------------------------------------- distillation

STUDENT = ModelConfig(arch="llama", vocab_size=96, hidden_size=16, intermediate_size=32,
                      num_layers=1, num_heads=2, num_kv_heads=2, logits_chunk=8)


def _ref_distill(s_params, t_params, batch, *, kl_weight, temperature, ce_weight):
    """Full-vocabulary reference from `model.forward` logits."""
    mask = batch.segments_NxL > 0
    ls = M.forward(s_params, batch.tokens_NxL, STUDENT, mask)[:, :-1]
    lt = M.forward(t_params, batch.tokens_NxL, CFG, mask)[:, :-1]
    tg = batch.tokens_NxL[:, 1:]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(ls, -1), tg[..., None], -1)[..., 0]
    pt = jax.nn.softmax(lt / temperature, -1)
    kl = jnp.sum(pt * (jnp.log(pt) - jax.nn.log_softmax(ls / temperature, -1)), -1)
    w = batch.weights_NxT
    return jnp.sum((ce_weight * nll + kl_weight * temperature ** 2 * kl) * w) / w.sum()


def test_kl_is_zero_for_the_teacher_itself_and_positive_otherwise(tok):
    _, batch = _one_batch(tok, PAIRS[:4])
    teacher = _params(6)
    kw = dict(kl_weight=1.0, temperature=2.0, ce_weight=0.0)
    s, c = distill_loss(teacher, CFG, teacher, CFG, batch, **kw)
    assert abs(float(s / c)) < 1e-6
    s, c = distill_loss(_params(7), CFG, teacher, CFG, batch, **kw)
    assert float(s / c) > 1e-2


def test_distill_gradient_matches_a_direct_reference(tok):
    _, batch = _one_batch(tok, PAIRS[:3])
    student, teacher = _params(8, STUDENT), _params(9)  # different sizes, archs: same vocab
    kw = dict(kl_weight=0.7, temperature=1.5, ce_weight=0.3)

    def ours(p):
        s, c = distill_loss(p, STUDENT, teacher, CFG, batch, **kw)
        return s / c

    (v1, g1), (v2, g2) = (jax.jit(jax.value_and_grad(f))(student)
                          for f in (ours, lambda p: _ref_distill(p, teacher, batch, **kw)))
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g1)) > 1e-3


def test_logit_distillation_moves_the_student_toward_the_teacher(tok):
    # Packed rows: the 8 pairs (103 tokens) fit in 2 rows of 64 tokens, 1 row per batch.
    scfg = SFTConfig(epochs=8, batch_size=1, max_len=64, packing="pack", optim=OptimConfig(lr=1e-2))
    res = distill_logits(_params(10, STUDENT), STUDENT, _params(11), CFG, tok, PAIRS, scfg,
                         heldout_pairs=PAIRS)
    first, last = res.heldout[0][1], res.heldout[-1][1]  # mean KL(teacher || student)
    assert last < 0.5 * first, res.heldout
    assert res.shapes == ((1, 64),) and len(res.losses) == 16
    assert res.padding_fraction < 0.25


def test_distill_sft_is_sft_and_micro_batches_keep_the_token_mean(tok):
    scfg = SFTConfig(epochs=2, batch_size=4, max_len=64, heldout_fraction=0.25, num_buckets=1,
                     optim=OptimConfig(lr=1e-3))
    micro = dataclasses.replace(scfg, optim=OptimConfig(lr=1e-3, micro_batches=2))
    a = distill_sft(_params(12, STUDENT), STUDENT, tok, PAIRS, micro)
    b = train_sft_dataset(_params(12, STUDENT), STUDENT, tok, PAIRS, scfg)
    # Micro-batches of 2 rows hold different numbers of completion tokens: dividing the summed
    # gradient once by the batch's count keeps the update equal to the whole batch's.
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-5)
    np.testing.assert_allclose([l for _, l in a.heldout], [l for _, l in b.heldout], rtol=1e-5)
    assert len(a.losses) == 4  # 6 training pairs (2 held out) in batches of 4 rows, 2 epochs
    assert [s for s, _ in a.heldout] == [0, 4] and a.heldout[1][1] < a.heldout[0][1]
    ex, _ = encode_examples(tok, PAIRS, 64)
    assert a.tokens_seen < 2 * sum(len(e.ids) for e in ex)


def test_vocab_mismatch_names_both_sizes(tok):
    other = dataclasses.replace(CFG, vocab_size=128)
    with pytest.raises(ValueError, match=r"teacher vocab_size=128 != student vocab_size=96"):
        distill_logits(_params(0), CFG, None, other, tok, PAIRS, SFTConfig())
