"""Supervised next-token training: the tiny experiments' stand-in pretraining, and the SFT core
(cold start, post-rejection-sampling SFT and distillation build on it)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from grpo_jax import model
from grpo_jax.config import ModelConfig, OptimConfig
from grpo_jax.optim import make_optimizer


def encode_pairs(tok, pairs: Sequence[tuple[str, str]], max_len: int, *, prompt_loss: bool,
                 bucket: int = 16):
    """Right-padded tokens, attention mask, and loss mask [N, L] over (prompt, completion) text
    pairs; the completion ends with EOS. L is the longest pair rounded up to `bucket` (few
    distinct shapes, few compiles), at most `max_len`. `prompt_loss=False` masks the prompt."""
    n = len(pairs)
    encoded = [(tok(p, add_special_tokens=False).input_ids,
                tok(c, add_special_tokens=False).input_ids + [tok.eos_token_id]) for p, c in pairs]
    longest = max(len(pi) + len(ci) for pi, ci in encoded)
    max_len = min(max_len, -(-longest // bucket) * bucket)
    tokens = np.full((n, max_len), tok.pad_token_id, np.int32)
    attn = np.zeros((n, max_len), bool)
    loss = np.zeros((n, max_len), bool)
    for i, (pi, ci) in enumerate(encoded):
        ids = (pi + ci)[:max_len]
        tokens[i, :len(ids)] = ids
        attn[i, :len(ids)] = True
        loss[i, (0 if prompt_loss else len(pi)):len(ids)] = True
    return tokens, attn, loss


def next_token_loss(params, cfg: ModelConfig, tokens_NxL, attn_NxL, loss_NxL):
    """Mean negative log-likelihood of the loss-masked target tokens."""
    logps = model.token_logprobs(params, tokens_NxL, cfg, attn_NxL)
    w = loss_NxL[:, 1:].astype(jnp.float32)
    return -jnp.sum(logps * w) / jnp.maximum(w.sum(), 1.0)


@dataclasses.dataclass
class SFTResult:
    params: dict
    losses: list[float]


def train_sft(params, cfg: ModelConfig, tok, sample_batch: Callable[[int], list[tuple[str, str]]], *,
              steps: int, batch_size: int, max_len: int, ocfg: OptimConfig, prompt_loss: bool,
              progress: Callable[[int, float], None] | None = None) -> SFTResult:
    """`steps` AdamW updates on batches from `sample_batch(step)` (deterministic in the step)."""
    tx = make_optimizer(ocfg, steps)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, tokens, attn, loss_mask):
        loss, grads = jax.value_and_grad(next_token_loss)(params, cfg, tokens, attn, loss_mask)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = jax.tree.map(jnp.array, params)  # own copies: the step donates them
    opt_state = tx.init(params)
    losses = []
    for s in range(steps):
        batch = encode_pairs(tok, sample_batch(s)[:batch_size], max_len, prompt_loss=prompt_loss)
        params, opt_state, loss = step(params, opt_state, *batch)
        losses.append(float(loss))
        if progress is not None:
            progress(s, losses[-1])
    return SFTResult(params=params, losses=losses)
