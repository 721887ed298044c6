"""Distillation into a smaller student (SPEC.md section 4, stage 6).

DeepSeek-R1 (section 2.4) distills by SFT only: the student, with its own `ModelConfig`, is
fine-tuned on the teacher's accepted samples, no RL. `distill_sft` is exactly that.

`distill_logits` additionally matches the teacher's full next-token distribution on the same
text (Hinton et al. 2015), which needs one shared tokenizer and vocabulary. Per completion token:

    l_t = ce_weight * (-log p_s(y_t)) + kl_weight * T^2 * KL(q_t^T || q_s^T)
    q^T = softmax(logits / T),   KL(q_t || q_s) = sum_v q_t(v) (log q_t(v) - log q_s(v))

(forward KL: the student covers every token the teacher gives mass to; T^2 keeps the gradient
scale independent of T), averaged over all completion tokens of the batch like SFT's NLL.

Memory: logits are made `student_cfg.logits_chunk` positions at a time under `jax.checkpoint`
(as `model.logprobs_from_hidden` does), so at most one [N, chunk, V] float32 block of logits per
model (plus its log-softmax) is alive, in the forward and the backward pass; the teacher's
hidden states [N, L, D_teacher] are kept. The teacher runs in the same jitted step, without
gradient (its params are not differentiated, and its logits are under `stop_gradient`).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from grpo_jax import model
from grpo_jax.config import ModelConfig
from grpo_jax.sft import (Batch, Pairs, Resumable, SFTConfig, SFTResult, batch_hidden, fit,
                          train_sft_dataset)


def distill_sft(student_params, student_cfg: ModelConfig, tok, pairs: Pairs, scfg: SFTConfig, *,
                heldout_pairs: Pairs | None = None,
                progress: Callable[[int, float], None] | None = None,
                on_eval: Callable[[int, float], None] | None = None,
                resumable: Resumable | None = None) -> SFTResult:
    """The paper's distillation: plain SFT of the student on the teacher's curated
    (prompt, completion) samples (`sft.train_sft_dataset`). The tokenizer `tok` is the
    student's; the teacher's text is simply re-tokenized, so vocabularies may differ."""
    return train_sft_dataset(student_params, student_cfg, tok, pairs, scfg,
                             heldout_pairs=heldout_pairs, progress=progress, on_eval=on_eval,
                             resumable=resumable)


def check_same_vocab(student_cfg: ModelConfig, teacher_cfg: ModelConfig) -> None:
    if student_cfg.vocab_size != teacher_cfg.vocab_size:
        raise ValueError(
            f"logit distillation needs one vocabulary: teacher vocab_size={teacher_cfg.vocab_size} "
            f"!= student vocab_size={student_cfg.vocab_size} (use distill_sft for models with "
            f"different tokenizers)")


def distill_terms(s_params, s_cfg: ModelConfig, h_s_NxTxD, t_params, t_cfg: ModelConfig,
                  h_t_NxTxD, targets_NxT, temperature: float):
    """Per position: the student's NLL of the target [N, T] and KL(teacher^T || student^T)
    [N, T] over the full vocabulary, chunked over T (see the module docstring)."""
    n, t, _ = h_s_NxTxD.shape
    c = min(s_cfg.logits_chunk, t)
    pad = (-t) % c

    def split(x):
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return x.reshape(n, -1, c, *x.shape[2:]).swapaxes(0, 1)

    @jax.checkpoint
    def chunk(args):
        hs, ht, tg = args
        logits_s = model.unembed(s_params, hs, s_cfg)
        logits_t = jax.lax.stop_gradient(model.unembed(t_params, ht, t_cfg))
        logp_s = jax.nn.log_softmax(logits_s, axis=-1)
        nll = -jnp.take_along_axis(logp_s, tg[..., None], axis=-1)[..., 0]
        logq_s = (logp_s if temperature == 1.0
                  else jax.nn.log_softmax(logits_s / temperature, axis=-1))
        logq_t = jax.nn.log_softmax(logits_t / temperature, axis=-1)
        kl = jnp.sum(jnp.exp(logq_t) * (logq_t - logq_s), axis=-1)
        return nll, kl

    nll, kl = jax.lax.map(chunk, (split(h_s_NxTxD), split(h_t_NxTxD), split(targets_NxT)))
    unsplit = lambda x: x.swapaxes(0, 1).reshape(n, -1)[:, :t]
    return unsplit(nll), unsplit(kl)


def distill_loss(s_params, s_cfg: ModelConfig, t_params, t_cfg: ModelConfig, batch: Batch, *,
                 kl_weight: float, temperature: float, ce_weight: float, packed: bool = False):
    """(sum over the batch's target tokens of l_t, their count); the objective is the ratio."""
    h_s = batch_hidden(s_params, s_cfg, batch, packed=packed)[:, :-1]
    h_t = jax.lax.stop_gradient(batch_hidden(t_params, t_cfg, batch, packed=packed))[:, :-1]
    targets = jnp.asarray(batch.tokens_NxL, jnp.int32)[:, 1:]
    nll, kl = distill_terms(s_params, s_cfg, h_s, t_params, t_cfg, h_t, targets, temperature)
    per_token = ce_weight * nll + kl_weight * temperature ** 2 * kl
    w = jnp.asarray(batch.weights_NxT, jnp.float32)
    return jnp.sum(per_token * w), jnp.sum(w)


def distill_logits(student_params, student_cfg: ModelConfig, teacher_params,
                   teacher_cfg: ModelConfig, tok, pairs: Pairs, scfg: SFTConfig, *,
                   kl_weight: float = 1.0, temperature: float = 1.0, ce_weight: float = 0.0,
                   heldout_pairs: Pairs | None = None,
                   progress: Callable[[int, float], None] | None = None,
                   on_eval: Callable[[int, float], None] | None = None,
                   resumable: Resumable | None = None) -> SFTResult:
    """Logit distillation on the teacher's samples, with SFT's data pipeline and loop
    (`sft.fit`): loss = ce_weight * NLL + kl_weight * T^2 * KL(teacher || student) per completion
    token, token mean. Held-out losses are of the same objective (with ce_weight = 0 they are
    T^2 times the mean KL)."""
    check_same_vocab(student_cfg, teacher_cfg)
    if kl_weight < 0 or ce_weight < 0 or kl_weight + ce_weight == 0:
        raise ValueError(f"kl_weight and ce_weight: must be >= 0 and not both 0, got "
                         f"kl_weight={kl_weight}, ce_weight={ce_weight}")
    if not temperature > 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    packed = scfg.packing == "pack"

    def objective(p, batch, t_params):
        return distill_loss(p, student_cfg, t_params, teacher_cfg, batch, kl_weight=kl_weight,
                            temperature=temperature, ce_weight=ce_weight, packed=packed)

    return fit(student_params, student_cfg, tok, pairs, scfg, objective, extra=(teacher_params,),
               heldout_pairs=heldout_pairs, progress=progress, on_eval=on_eval,
               resumable=resumable)
