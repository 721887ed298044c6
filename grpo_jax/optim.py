"""The optimizer shared by every trainer: optax AdamW, warm-up, constant or cosine schedule,
global-norm clipping."""

from __future__ import annotations

import optax

from grpo_jax.config import OptimConfig


def lr_schedule(ocfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 over `warmup_steps`, then constant or cosine down to
    lr * min_lr_ratio at `total_steps` (counted in optimizer updates)."""
    warm = max(ocfg.warmup_steps, 0)
    if ocfg.schedule == "constant":
        after = optax.constant_schedule(ocfg.lr)
    else:
        after = optax.cosine_decay_schedule(ocfg.lr, max(total_steps - warm, 1), alpha=ocfg.min_lr_ratio)
    if warm == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, ocfg.lr, warm), after], [warm])


def make_optimizer(ocfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    parts = [optax.clip_by_global_norm(ocfg.clip_norm)] if ocfg.clip_norm > 0 else []
    parts.append(optax.adamw(lr_schedule(ocfg, total_steps), b1=ocfg.b1, b2=ocfg.b2, eps=ocfg.eps,
                             weight_decay=ocfg.weight_decay))
    return optax.chain(*parts)
