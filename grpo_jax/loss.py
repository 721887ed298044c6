"""The GRPO loss family: advantages, KL estimators, ratios, clipped surrogate, aggregations.

Every published variant is one surrogate with a few switches (SPEC.md section 2); each switch is
a small registry of pure functions keyed by its mode name, so a variant is a config string, never
a new branch in a long loss. All functions are pure and jit-able; mode strings and
`max_completion_len` are static (mark them with `static_argnames` when jitting `grpo_loss`), and
so is `beta` unless it is a traced per-run value of a vectorized sweep (see `grpo_loss`).

Shapes: B prompts, G completions per prompt, N = B * G completions, T completion length.
`mask_NxT` is 1 on completion tokens and 0 on padding; padded positions may hold any value,
even inf or NaN, and never reach the loss, its gradient or the metrics.
"""

from typing import Callable, Literal, Mapping, TypeVar

import jax
import jax.numpy as jnp

AdvantageMode = Literal["group_std", "none", "batch_std", "rloo"]
KLEstimator = Literal["k1", "k2", "k3"]
RatioLevel = Literal["token", "sequence"]
Aggregation = Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"]

F = TypeVar("F", bound=Callable)


def _register(registry: dict, name: str) -> Callable[[F], F]:
    def add(fn: F) -> F:
        registry[name] = fn
        return fn

    return add


def _lookup(registry: Mapping[str, F], name: str, what: str) -> F:
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; allowed: {', '.join(sorted(registry))}")
    return registry[name]


def _masked_sum(x_NxT, mask_NxT, axis=None):
    """sum(m x) where a masked-out inf/NaN counts as 0 (a plain x * m would give NaN)."""
    return jnp.sum(jnp.where(mask_NxT > 0, x_NxT, 0.0) * mask_NxT, axis=axis)


def _masked_mean(x_NxT, mask_NxT):
    """sum(m x) / max(sum(m), 1): 0, not NaN, when nothing is masked in."""
    return _masked_sum(x_NxT, mask_NxT) / jnp.maximum(jnp.sum(mask_NxT), 1.0)


# ---------------------------------------------------------------- advantages (per completion)

ADVANTAGES: dict[str, Callable] = {}


def _group_mean(rewards_BxG):
    return jnp.mean(rewards_BxG, axis=1, keepdims=True)


def _check_ddof(count: int, std_ddof: int, what: str):
    if count <= std_ddof:
        raise ValueError(f"{what} std with ddof={std_ddof} needs more than {std_ddof} rewards, got {count}")


@_register(ADVANTAGES, "group_std")
def group_std_advantages(rewards_BxG, *, eps=1e-4, std_ddof=1):
    """GRPO (DeepSeekMath eq. 3, outcome supervision): A_i = (R_i - mean_g R) / (std_g R + eps).

    The std is Bessel-corrected by default (ddof=1), as in the PyTorch peers (TRL, verl)."""
    _check_ddof(rewards_BxG.shape[1], std_ddof, "group")
    std_Bx1 = jnp.std(rewards_BxG, axis=1, keepdims=True, ddof=std_ddof)
    return (rewards_BxG - _group_mean(rewards_BxG)) / (std_Bx1 + eps)


@_register(ADVANTAGES, "none")
def mean_centered_advantages(rewards_BxG, *, eps=1e-4, std_ddof=1):
    """Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training"): A_i = R_i - mean_g R; no std division (its bias)."""
    del eps, std_ddof
    return rewards_BxG - _group_mean(rewards_BxG)


@_register(ADVANTAGES, "batch_std")
def batch_std_advantages(rewards_BxG, *, eps=1e-4, std_ddof=1):
    """TRL `scale_rewards="batch"`: A_i = (R_i - mean_g R) / (std over all B*G rewards + eps)."""
    _check_ddof(rewards_BxG.size, std_ddof, "batch")
    std = jnp.std(rewards_BxG, ddof=std_ddof)
    return (rewards_BxG - _group_mean(rewards_BxG)) / (std + eps)


@_register(ADVANTAGES, "rloo")
def rloo_advantages(rewards_BxG, *, eps=1e-4, std_ddof=1):
    """RLOO (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019): A_i = R_i - 1/(G-1) sum_{j != i} R_j.

    Equals G/(G-1) (R_i - mean_g R); needs G >= 2."""
    del eps, std_ddof
    g = rewards_BxG.shape[1]
    if g < 2:
        raise ValueError(f"rloo advantages need a group size G >= 2, got {g}")
    others_mean_BxG = (jnp.sum(rewards_BxG, axis=1, keepdims=True) - rewards_BxG) / (g - 1)
    return rewards_BxG - others_mean_BxG


def compute_advantages(rewards_BxG, mode: AdvantageMode, *, eps=1e-4, std_ddof=1):
    """Per-completion advantages adv_BxG (shared by all tokens of a completion); see ADVANTAGES."""
    fn = _lookup(ADVANTAGES, mode, "advantage mode")
    return fn(jnp.asarray(rewards_BxG, jnp.float32), eps=eps, std_ddof=std_ddof)


def zero_std_groups(rewards_BxG):
    """bool_B: groups whose rewards all agree; their advantage is 0 and they carry no signal
    (DAPO "dynamic sampling" drops and refills them)."""
    return jnp.all(rewards_BxG == rewards_BxG[:, :1], axis=1)


# ---------------------------------------------------------------- KL estimators (per token)

KL_ESTIMATORS: dict[str, Callable] = {}


@_register(KL_ESTIMATORS, "k1")
def kl_k1(logps, ref_logps):
    """k1 = log pi_theta - log pi_ref (Schulman 2020): unbiased, high variance, can be < 0."""
    return logps - ref_logps


@_register(KL_ESTIMATORS, "k2")
def kl_k2(logps, ref_logps):
    """k2 = 1/2 (log pi_theta - log pi_ref)^2 (Schulman 2020): >= 0, low variance, biased."""
    return 0.5 * jnp.square(logps - ref_logps)


@_register(KL_ESTIMATORS, "k3")
def kl_k3(logps, ref_logps):
    """k3 = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1 (Schulman 2020; DeepSeekMath eq. 4): >= 0."""
    log_ref_ratio = ref_logps - logps
    return jnp.exp(log_ref_ratio) - log_ref_ratio - 1.0


# ---------------------------------------------------------------- importance ratios

RATIOS: dict[str, Callable] = {}


@_register(RATIOS, "token")
def token_ratio(logps_NxT, old_logps_NxT, mask_NxT):
    """GRPO/PPO: r_{i,t} = pi_theta(o_{i,t} | q, o_{i,<t}) / pi_old(o_{i,t} | q, o_{i,<t})."""
    del mask_NxT
    return jnp.exp(logps_NxT - old_logps_NxT)


@_register(RATIOS, "sequence")
def sequence_ratio(logps_NxT, old_logps_NxT, mask_NxT):
    """GSPO (Zheng et al. 2025, sequence-level ratio): s_i = exp(1/|o_i| sum_t log r_{i,t}), broadcast to tokens.

    Implemented in the sequence form: the gradient flows through the mean of log r. Because every
    aggregation here weighs the tokens of one sequence equally and A_i is per sequence, the
    gradient equals that of GSPO-token (s_{i,t} = sg[s_i] pi_t / sg[pi_t]), as the paper
    notes for GSPO. Empty sequences get s_i = 1."""
    log_r_N = _masked_sum(logps_NxT - old_logps_NxT, mask_NxT, axis=1)
    log_r_N = log_r_N / jnp.maximum(jnp.sum(mask_NxT, axis=1), 1.0)
    return jnp.broadcast_to(jnp.exp(log_r_N)[:, None], logps_NxT.shape)


def clipped_surrogate(ratio_NxT, adv_N, *, eps_low=0.2, eps_high=0.2):
    """PPO/GRPO per-token surrogate (DeepSeekMath eq. 3; asymmetric "Clip-Higher", DAPO sec. 3.1):
    min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)."""
    adv_Nx1 = adv_N[:, None]
    clipped_NxT = jnp.clip(ratio_NxT, 1.0 - eps_low, 1.0 + eps_high)
    return jnp.minimum(ratio_NxT * adv_Nx1, clipped_NxT * adv_Nx1)


# ---------------------------------------------------------------- aggregations (tokens -> scalar)

AGGREGATIONS: dict[str, Callable] = {}


@_register(AGGREGATIONS, "seq_mean_token_mean")
def seq_mean_token_mean(x_NxT, mask_NxT, *, max_completion_len=None):
    """GRPO (DeepSeekMath eq. 3): 1/N sum_i 1/|o_i| sum_t x_{i,t}. Empty sequences add 0."""
    del max_completion_len
    per_seq_N = _masked_sum(x_NxT, mask_NxT, axis=1) / jnp.maximum(jnp.sum(mask_NxT, axis=1), 1.0)
    return jnp.mean(per_seq_N)


@_register(AGGREGATIONS, "token_mean")
def token_mean(x_NxT, mask_NxT, *, max_completion_len=None):
    """DAPO (sec. 3.3, token-level policy gradient loss): 1/sum_i |o_i| sum_i sum_t x_{i,t}."""
    del max_completion_len
    return _masked_mean(x_NxT, mask_NxT)


@_register(AGGREGATIONS, "seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(x_NxT, mask_NxT, *, max_completion_len=None):
    """Dr. GRPO (Liu et al. 2025; TRL loss_type="dr_grpo"): 1/(N L_max) sum_i sum_t x_{i,t}, a constant normaliser
    (G * L_max per group) instead of 1/|o_i|. L_max defaults to T."""
    l_max = mask_NxT.shape[1] if max_completion_len is None else max_completion_len
    return _masked_sum(x_NxT, mask_NxT) / (mask_NxT.shape[0] * l_max)


# ---------------------------------------------------------------- the loss


def grpo_loss(
    logps_NxT,
    old_logps_NxT,
    ref_logps_NxT,
    adv_N,
    mask_NxT,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    beta: float = 0.0,
    kl_estimator: KLEstimator = "k3",
    ratio_level: RatioLevel = "token",
    aggregation: Aggregation = "seq_mean_token_mean",
    max_completion_len: int | None = None,
):
    """loss = -J, with J the GRPO objective (DeepSeekMath eq. 3) and its switches:

        J = Agg_{i,t}[ min(r A_i, clip(r, 1 - eps_low, 1 + eps_high) A_i) - beta KL_{i,t} ]

    r is `ratio_level` (token r_{i,t} or GSPO s_i), KL is `kl_estimator`, Agg is `aggregation`.
    `beta` is a static Python float: at 0 the reference is never read by the loss and may be None
    (the `kl` metric still reports it when given). With mu = 1 pass
    old_logps = stop_gradient(logps): the loss is -Agg(A) while its gradient is not 0.

    `beta`, `eps_low` and `eps_high` may also be traced scalars (one value per run of a vmapped
    sweep, `grpo_jax.vectorized`). A traced beta needs `ref_logps` (any finite placeholder for a
    beta = 0 run): the KL term is computed for every run and counted where beta > 0 only, so a
    beta = 0 run gets the loss, gradient and `kl` metric (0) it gets without a reference.

    Returns (loss, metrics); metrics are token-masked means except `policy_loss` = -Agg(surrogate),
    so loss = policy_loss + beta * Agg(KL). clip_frac_low/high count tokens whose clip is active
    (r < 1 - eps_low with A < 0; r > 1 + eps_high with A > 0), where the gradient is 0.
    """
    ratio_fn = _lookup(RATIOS, ratio_level, "ratio level")
    kl_fn = _lookup(KL_ESTIMATORS, kl_estimator, "KL estimator")
    agg_fn = _lookup(AGGREGATIONS, aggregation, "aggregation")
    static_beta = isinstance(beta, (int, float))
    if ref_logps_NxT is None and not static_beta:
        raise ValueError("a traced beta (one per vmapped run) needs ref_logps_NxT; give beta = 0 runs "
                         "a finite placeholder such as their sampler log-probs")
    if ref_logps_NxT is None and beta != 0.0:
        raise ValueError(f"beta={beta} needs ref_logps_NxT; pass beta=0.0 to train without a reference")

    valid_NxT = jnp.asarray(mask_NxT).astype(bool)
    mask_NxT = valid_NxT.astype(jnp.float32)

    def clean(x_NxT):  # zero padded positions first, so inf/NaN there cannot reach exp or grads
        return jnp.where(valid_NxT, jnp.asarray(x_NxT, jnp.float32), 0.0)

    logps_NxT, old_logps_NxT = clean(logps_NxT), clean(old_logps_NxT)
    adv_N = jnp.asarray(adv_N, jnp.float32)
    aggregate = lambda x_NxT: agg_fn(x_NxT, mask_NxT, max_completion_len=max_completion_len)

    ratio_NxT = ratio_fn(logps_NxT, old_logps_NxT, mask_NxT)
    policy_loss = -aggregate(clipped_surrogate(ratio_NxT, adv_N, eps_low=eps_low, eps_high=eps_high))

    kl_NxT = None if ref_logps_NxT is None else kl_fn(logps_NxT, clean(ref_logps_NxT))
    if static_beta:
        loss = policy_loss if beta == 0.0 else policy_loss + beta * aggregate(kl_NxT)
    else:  # counted where beta > 0 only; a beta = 0 run's placeholder must keep its KL finite
        # (its gradient still flows, times 0, and 0 * inf is NaN)
        loss = jnp.where(beta > 0, policy_loss + beta * aggregate(kl_NxT), policy_loss)

    metrics = _metrics(ratio_NxT, adv_N, kl_NxT, mask_NxT, valid_NxT, eps_low, eps_high)
    if not static_beta:
        metrics["kl"] = jnp.where(beta > 0, metrics["kl"], 0.0)
    metrics["policy_loss"] = policy_loss
    return loss, metrics


def _metrics(ratio_NxT, adv_N, kl_NxT, mask_NxT, valid_NxT, eps_low, eps_high):
    """Token-masked diagnostics, all scalars; gradients are stopped."""
    ratio_NxT, adv_N = jax.lax.stop_gradient((ratio_NxT, adv_N))
    adv_NxT = jnp.broadcast_to(adv_N[:, None], ratio_NxT.shape)
    low_NxT = (ratio_NxT < 1.0 - eps_low) & (adv_NxT < 0)
    high_NxT = (ratio_NxT > 1.0 + eps_high) & (adv_NxT > 0)
    any_token = jnp.any(valid_NxT)
    ratio_min = jnp.min(jnp.where(valid_NxT, ratio_NxT, jnp.inf))
    ratio_max = jnp.max(jnp.where(valid_NxT, ratio_NxT, -jnp.inf))
    kl = 0.0 if kl_NxT is None else _masked_mean(jax.lax.stop_gradient(kl_NxT), mask_NxT)
    return {
        "kl": jnp.asarray(kl, jnp.float32),
        "clip_frac_low": _masked_mean(low_NxT, mask_NxT),
        "clip_frac_high": _masked_mean(high_NxT, mask_NxT),
        "clip_frac": _masked_mean(low_NxT | high_NxT, mask_NxT),
        "ratio_mean": _masked_mean(ratio_NxT, mask_NxT),
        "ratio_min": jnp.where(any_token, ratio_min, 1.0),  # 1, not inf, for an all-padding batch
        "ratio_max": jnp.where(any_token, ratio_max, 1.0),
        "adv_mean": _masked_mean(adv_NxT, mask_NxT),
    }
