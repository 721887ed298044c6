"""Golden values for the GRPO loss family, computed by hand on small explicit arrays.

Each test notes what a wrong variant would give, so that it can fail."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grpo_jax import loss as L

ATOL = 1e-5
REWARDS_BxG = np.array([[1.0, 2.0, 3.0], [4.0, 1.0, 1.0]], np.float32)


def _close(actual, expected, atol=ATOL):
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected, np.float32), rtol=0, atol=atol)


# ---------------------------------------------------------------- advantages

# Group 1 [1, 2, 3]: mean 2, deviations [-1, 0, 1], Bessel std sqrt(2/2) = 1.
# Group 2 [4, 1, 1]: mean 2, deviations [2, -1, -1], Bessel std sqrt(6/2) = sqrt(3).
CENTERED = np.array([[-1.0, 0.0, 1.0], [2.0, -1.0, -1.0]])


def test_group_std_advantages():
    eps = 1e-4
    expected = CENTERED / np.array([[1.0 + eps], [math.sqrt(3.0) + eps]])
    _close(L.compute_advantages(REWARDS_BxG, "group_std", eps=eps), expected)
    # ddof = 0 (population std) would divide group 1 by sqrt(2/3): -1.2247, not -1.
    assert abs(float(L.compute_advantages(REWARDS_BxG, "group_std", std_ddof=0)[0, 0]) + 1.2247) < 1e-3


def test_none_advantages_are_mean_centered():
    # Dr. GRPO: no std division; group_std would give 1.1547 for R = 4.
    _close(L.compute_advantages(REWARDS_BxG, "none"), CENTERED)


def test_batch_std_advantages():
    # All six rewards [1, 2, 3, 4, 1, 1]: mean 2, squared deviations sum to 8, Bessel std sqrt(8/5).
    # A per-group std would give group 1 std 1 (adv -1 instead of -0.7905).
    expected = CENTERED / (math.sqrt(8.0 / 5.0) + 1e-4)
    _close(L.compute_advantages(REWARDS_BxG, "batch_std"), expected)


def test_rloo_advantages():
    # R_i - mean of the two others: 1 - (2+3)/2 = -1.5, 2 - 2 = 0, 3 - 1.5 = 1.5; 4 - 1 = 3, 1 - 2.5 = -1.5.
    # Including R_i in the baseline (plain mean centering) would give [-1, 0, 1], [2, -1, -1].
    expected = [[-1.5, 0.0, 1.5], [3.0, -1.5, -1.5]]
    _close(L.compute_advantages(REWARDS_BxG, "rloo"), expected)


@pytest.mark.parametrize("mode", sorted(L.ADVANTAGES))
def test_permuting_a_group_permutes_its_advantages(mode):
    rewards = np.array([[0.3, 1.0, 0.0, 0.7], [2.0, -1.0, 0.5, 0.0]], np.float32)
    perm = np.array([2, 0, 3, 1])
    permuted = rewards.copy()
    permuted[1] = rewards[1, perm]
    adv = np.asarray(L.compute_advantages(rewards, mode))
    adv_perm = np.asarray(L.compute_advantages(permuted, mode))
    _close(adv_perm[1], adv[1, perm])
    _close(adv_perm[0], adv[0])
    assert not np.allclose(adv[1], adv[1, perm])  # the permutation is not the identity on values


@pytest.mark.parametrize("mode", sorted(L.ADVANTAGES))
def test_zero_std_group_has_zero_advantage_and_is_flagged(mode):
    rewards = np.array([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0]], np.float32)
    adv = np.asarray(L.compute_advantages(rewards, mode))
    _close(adv[0], [0.0, 0.0, 0.0])
    assert np.all(np.isfinite(adv)) and np.any(adv[1] != 0)
    assert np.asarray(L.zero_std_groups(rewards)).tolist() == [True, False]


def test_advantage_group_too_small_errors():
    with pytest.raises(ValueError, match="G >= 2"):
        L.compute_advantages(np.ones((2, 1), np.float32), "rloo")
    with pytest.raises(ValueError, match="ddof=1"):
        L.compute_advantages(np.ones((2, 1), np.float32), "group_std")


# ---------------------------------------------------------------- KL estimators

LOGPS = np.array([-1.0, -2.0], np.float32)
REF = np.array([-1.5, -1.0], np.float32)  # logp - ref = [0.5, -1.0]


def test_kl_estimators_hand_values():
    _close(L.KL_ESTIMATORS["k1"](LOGPS, REF), [0.5, -1.0])
    _close(L.KL_ESTIMATORS["k2"](LOGPS, REF), [0.125, 0.5])
    # k3 with x = ref - logp = [-0.5, 1]: e^-0.5 + 0.5 - 1 = 0.1065307, e - 2 = 0.7182818.
    # The reversed ratio (x = logp - ref) would give [0.1487, 0.3679].
    _close(L.KL_ESTIMATORS["k3"](LOGPS, REF), [0.1065307, 0.7182818])


def test_k3_nonnegative_and_all_zero_at_reference():
    x = jax.random.normal(jax.random.key(0), (2, 64)) * 3.0
    assert float(jnp.min(L.kl_k3(x[0], x[1]))) >= 0.0
    for name, kl in L.KL_ESTIMATORS.items():
        assert float(jnp.max(jnp.abs(kl(x[0], x[0])))) == 0.0, name


# ---------------------------------------------------------------- aggregations

X_NxT = np.array([[1.0, 2.0, 3.0, 4.0], [10.0, np.nan, np.inf, 7.0], [5.0, 5.0, 5.0, 5.0]], np.float32)
MASK_NxT = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], np.float32)  # lengths 4, 1, 0


def test_aggregations_differ_and_match_hand_values():
    expected = {
        "seq_mean_token_mean": (2.5 + 10.0 + 0.0) / 3,  # per-sequence means, empty one adds 0
        "token_mean": (1 + 2 + 3 + 4 + 10) / 5,  # 4.0: one mean over the 5 real tokens
        "seq_mean_token_sum_norm": 20.0 / (3 * 4),  # token sum / (N * T)
    }
    got = {name: float(agg(X_NxT, MASK_NxT)) for name, agg in L.AGGREGATIONS.items()}
    assert set(got) == set(expected)
    for name in expected:
        assert abs(got[name] - expected[name]) < ATOL, (name, got[name])
    assert len({round(v, 4) for v in got.values()}) == 3
    # Dr. GRPO's constant is N * L_max, not N * T: L_max = 5 gives 20 / 15.
    _close(L.seq_mean_token_sum_norm(X_NxT, MASK_NxT, max_completion_len=5), 20.0 / 15)


# ---------------------------------------------------------------- grpo_loss

ADV_N = np.array([1.0, -2.0, 0.5], np.float32)
MASK3_NxT = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], np.float32)  # lengths 4, 2, 1


def _loss(logps, old, ref=None, adv=ADV_N, mask=MASK3_NxT, **kw):
    return L.grpo_loss(logps, old, ref, adv, mask, **kw)


def test_ratio_one_loss_is_minus_mean_advantage_with_nonzero_grad():
    logps = jax.random.normal(jax.random.key(1), MASK3_NxT.shape) - 2.0
    f = lambda lp: _loss(lp, jax.lax.stop_gradient(lp))[0]
    loss, grad = jax.value_and_grad(f)(logps)
    _close(loss, -ADV_N.mean())  # -(1 - 2 + 0.5) / 3 = 1/6
    # d loss / d logp_{i,t} = -A_i / (N |o_i|) on real tokens, 0 on padding.
    lengths = MASK3_NxT.sum(1, keepdims=True)
    _close(grad, -ADV_N[:, None] / (3 * lengths) * MASK3_NxT)
    assert float(jnp.max(jnp.abs(grad))) > 0.1


def test_beta_zero_ignores_the_reference():
    logps = jax.random.normal(jax.random.key(2), MASK3_NxT.shape) - 2.0
    old = logps + 0.1
    garbage = jnp.full_like(logps, jnp.nan)

    def value_and_grad(ref):
        return jax.value_and_grad(lambda lp: _loss(lp, old, ref, beta=0.0)[0])(logps)

    (l_none, g_none), (l_nan, g_nan) = value_and_grad(None), value_and_grad(garbage)
    assert np.isfinite(float(l_none)) and float(l_none) == float(l_nan)
    np.testing.assert_array_equal(np.asarray(g_none), np.asarray(g_nan))
    # The kl metric: 0 without a reference, the real value with one even at beta = 0.
    assert float(_loss(logps, old, None)[1]["kl"]) == 0.0
    _close(_loss(logps, old, logps - 0.5, kl_estimator="k1")[1]["kl"], 0.5)
    with pytest.raises(ValueError, match="ref_logps"):
        _loss(logps, old, None, beta=0.04)


def test_clipping_values_gradients_and_fractions():
    # One token each, old logp 0: ratios [1.5, 1.5, 0.5, 0.5], advantages [+1, -1, +1, -1], eps 0.2.
    #   r=1.5 A=+1: min(1.5, 1.2) = 1.2   clipped high, grad 0
    #   r=1.5 A=-1: min(-1.5, -1.2) = -1.5  not clipped, dJ/dlogp = r A = -1.5
    #   r=0.5 A=+1: min(0.5, 0.8) = 0.5   not clipped, dJ/dlogp = 0.5
    #   r=0.5 A=-1: min(-0.5, -0.8) = -0.8  clipped low, grad 0
    # J = (1.2 - 1.5 + 0.5 - 0.8) / 4 = -0.15. Without clipping J would be 0.
    logps = jnp.log(jnp.array([[1.5], [1.5], [0.5], [0.5]]))
    adv, mask = np.array([1.0, -1.0, 1.0, -1.0], np.float32), np.ones((4, 1), np.float32)
    f = lambda lp: _loss(lp, jnp.zeros_like(lp), adv=adv, mask=mask)
    (loss, m), grad = jax.value_and_grad(f, has_aux=True)(logps)
    _close(loss, 0.15)
    _close(grad[:, 0], [0.0, 1.5 / 4, -0.5 / 4, 0.0])
    for name, value in dict(clip_frac_low=0.25, clip_frac_high=0.25, clip_frac=0.5, ratio_mean=1.0,
                            ratio_min=0.5, ratio_max=1.5, adv_mean=0.0, policy_loss=0.15).items():
        _close(m[name], value)


def test_clip_higher_asymmetric_eps():
    # r = 1.25 with A = +1 is clipped at eps_high = 0.2 (value 1.2, grad 0) but not at DAPO's 0.28.
    # r = 0.75 with A = -1 stays clipped at eps_low = 0.2 (value -0.8) either way.
    logps = jnp.log(jnp.array([[1.25], [0.75]]))
    adv, mask = np.array([1.0, -1.0], np.float32), np.ones((2, 1), np.float32)

    def run(eps_high):
        f = lambda lp: _loss(lp, jnp.zeros_like(lp), adv=adv, mask=mask, eps_high=eps_high)
        return jax.value_and_grad(f, has_aux=True)(logps)

    (sym, m_sym), g_sym = run(0.2)
    (asym, m_asym), g_asym = run(0.28)
    _close(sym, -(1.2 - 0.8) / 2)
    _close(asym, -(1.25 - 0.8) / 2)
    _close(g_sym[:, 0], [0.0, 0.0])
    _close(g_asym[:, 0], [-1.25 / 2, 0.0])
    _close(m_sym["clip_frac_high"], 0.5)
    _close(m_asym["clip_frac_high"], 0.0)
    _close(m_asym["clip_frac_low"], 0.5)


def test_gspo_sequence_ratio_hand_values():
    # Sequence 0: log r = [0.2, -0.4, 0.5], mean 0.1 -> s = e^0.1 = 1.1051709 on every token.
    # Sequence 1: log r = [0.6, padding 9.0] -> s = e^0.6 = 1.8221188 (padding must not count:
    # a plain mean over T would give e^4.8). Token ratios would be [e^0.2, e^-0.4, e^0.5].
    old = np.zeros((2, 3), np.float32)
    logps = np.array([[0.2, -0.4, 0.5], [0.6, 9.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 1], [1, 0, 0]], np.float32)
    ratio = np.asarray(L.sequence_ratio(logps, old, mask))
    _close(ratio[0], [1.1051709] * 3)
    _close(ratio[1, 0], 1.8221188)
    # Loss with A = [1, 1], eps 0.2: min(1.105, 1.2) = 1.105 and min(1.822, 1.2) = 1.2.
    loss, m = L.grpo_loss(logps, old, None, np.ones(2, np.float32), mask, ratio_level="sequence")
    _close(loss, -(1.1051709 + 1.2) / 2)
    _close(m["clip_frac_high"], 1 / 4)  # the one real token of sequence 1


@pytest.mark.parametrize("aggregation", sorted(L.AGGREGATIONS))
def test_gspo_sequence_gradient_equals_gspo_token_form(aggregation):
    # GSPO-token: s_{i,t} = sg[s_i] * pi_t / sg[pi_t]; same value, and the same gradient as the
    # sequence form when A_i is per sequence. Ratios stay inside the clip range here.
    k_new, k_old = jax.random.split(jax.random.key(3))
    logps = jax.random.normal(k_new, MASK3_NxT.shape) * 0.05 - 1.0
    old = logps + jax.random.normal(k_old, MASK3_NxT.shape) * 0.05

    def token_form(lp):
        s_NxT = jax.lax.stop_gradient(L.sequence_ratio(lp, old, MASK3_NxT))
        ratio_NxT = s_NxT * jnp.exp(lp - jax.lax.stop_gradient(lp))
        surrogate = L.clipped_surrogate(ratio_NxT, ADV_N, eps_low=0.2, eps_high=0.2)
        return -L.AGGREGATIONS[aggregation](surrogate, MASK3_NxT)

    seq_form = lambda lp: _loss(lp, old, ratio_level="sequence", aggregation=aggregation)[0]
    _close(jax.grad(seq_form)(logps), jax.grad(token_form)(logps), atol=1e-6)
    assert float(jnp.max(jnp.abs(jax.grad(seq_form)(logps)))) > 0.01


def test_toy_gradient_with_k3_kl_by_hand():
    # One sequence of two tokens, token ratio, seq_mean_token_mean, beta = 0.1, k3:
    #   J = 1/2 sum_t [ r_t A - beta (e^{f_t - a_t} - (f_t - a_t) - 1) ],  r_t = e^{a_t - o_t}
    #   dJ/da_t = 1/2 [ r_t A + beta (e^{f_t - a_t} - 1) ]
    # a = [-1, -2], o = [-1.1, -1.9], f = [-1.5, -1], A = 0.5: r = [e^0.1, e^-0.1] (inside the clip)
    #   dJ/da_1 = 1/2 [1.1051709 * 0.5 + 0.1 (0.6065307 - 1)] = 0.2566189
    #   dJ/da_2 = 1/2 [0.9048374 * 0.5 + 0.1 (2.7182818 - 1)] = 0.3121235
    # Dropping the KL gradient would give [0.2762927, 0.2262094]; loss gradient = -dJ/da.
    a = jnp.array([[-1.0, -2.0]])
    o, f = np.array([[-1.1, -1.9]], np.float32), np.array([[-1.5, -1.0]], np.float32)
    adv, mask = np.array([0.5], np.float32), np.ones((1, 2), np.float32)
    f_loss = lambda lp: L.grpo_loss(lp, o, f, adv, mask, beta=0.1, kl_estimator="k3")[0]
    loss, grad = jax.value_and_grad(f_loss)(a)
    _close(grad, [[-0.2566189, -0.3121235]])
    j = 0.5 * ((1.1051709 * 0.5 - 0.1 * 0.1065307) + (0.9048374 * 0.5 - 0.1 * 0.7182818))
    _close(loss, -j)


def test_empty_sequences_and_garbage_padding_stay_finite_under_jit():
    mask = np.array([[1, 1, 0], [0, 0, 0]], np.float32)
    logps = jnp.array([[-1.0, -0.5, jnp.inf], [jnp.nan, -jnp.inf, 3.0]])
    old = jnp.array([[-1.2, -0.4, -jnp.inf], [0.0, jnp.nan, -50.0]])
    ref = jnp.array([[-1.1, -0.6, jnp.nan], [jnp.inf, 0.0, 80.0]])
    fn = jax.jit(functools.partial(L.grpo_loss, beta=0.04), static_argnames=("aggregation", "ratio_level"))
    for aggregation in L.AGGREGATIONS:
        for ratio_level in ("token", "sequence"):
            f = lambda lp: fn(lp, old, ref, np.array([1.0, -1.0], np.float32), mask,
                              aggregation=aggregation, ratio_level=ratio_level)
            (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(logps)
            assert np.isfinite(float(loss)), (aggregation, ratio_level)
            assert np.all(np.isfinite(np.asarray(grad))) and float(jnp.abs(grad[0, :2]).sum()) > 0
            _close(grad[1], [0.0, 0.0, 0.0])
            assert all(np.isfinite(float(v)) for v in metrics.values()), metrics
    # An all-padding batch: loss 0 and neutral ratio metrics, not NaN or inf.
    loss, metrics = L.grpo_loss(logps, old, None, np.ones(2, np.float32), np.zeros((2, 3), np.float32))
    assert float(loss) == 0.0 and float(metrics["ratio_min"]) == 1.0 == float(metrics["ratio_max"])


@pytest.mark.parametrize(
    "call, allowed",
    [
        (lambda: L.compute_advantages(REWARDS_BxG, "grpo"), "batch_std, group_std, none, rloo"),
        (lambda: _loss(LOGPS[None], LOGPS[None], mask=np.ones((1, 2)), kl_estimator="k4"), "k1, k2, k3"),
        (lambda: _loss(LOGPS[None], LOGPS[None], mask=np.ones((1, 2)), ratio_level="seq"), "sequence, token"),
        (lambda: _loss(LOGPS[None], LOGPS[None], mask=np.ones((1, 2)), aggregation="dapo"),
         "seq_mean_token_mean, seq_mean_token_sum_norm, token_mean"),
    ],
)
def test_unknown_mode_lists_allowed_values(call, allowed):
    with pytest.raises(ValueError, match="allowed: " + allowed):
        call()
