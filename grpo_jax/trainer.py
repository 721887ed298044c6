"""GRPO: rollout -> score -> update, as a few jitted programs built once.

One step (B prompts, G completions each, N = B * G):
  1. rollout  (jitted sampler, donated KV cache): N completions and their sampler log-probs;
  2. rewards  (host): decoded text through the reward registry, combined with weights;
  3. advantages, zero-std handling, truncation masking (host, tiny arrays);
  4. score    (jitted, no gradient): reference log-probs when beta > 0, old log-probs when the
              rollout is reused (mu > 1 or several minibatches);
  5. update   (jitted, donated state): `lax.scan` over mu epochs x minibatches, each minibatch's
              gradient accumulated over micro-batches.
Metrics are fetched one step late, so the device never waits for logging.

On a mesh (`GRPOTrainer(..., mesh=mesh)`), the state lives in the training layout (`rules`,
default `sharding.TRAIN_RULES`: FSDP + tensor parallel) from `init_state` on, the batch is split
over the data axes, and the rollout reshards the weights to the decoding layout (`sample_rules`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from grpo_jax import loss as L
from grpo_jax import model, sharding
from grpo_jax.config import Experiment, ModelConfig, SamplerConfig
from grpo_jax.optim import lr_schedule, make_optimizer
from grpo_jax.rewards import get_reward
from grpo_jax.rewards.combine import score_completions
from grpo_jax.rewards.length import overlong_penalty
from grpo_jax.sampler import Sampler, pad_prompts
from grpo_jax.tasks import Example
from grpo_jax.tasks.templates import format_prompt


@functools.partial(jax.tree_util.register_dataclass, data_fields=["params", "opt_state", "step"],
                   meta_fields=[])
@dataclasses.dataclass
class TrainState:
    params: Any
    opt_state: Any
    step: jax.Array  # optimizer updates so far


def prompt_ids(tok, texts: list[str], examples: list[Example], max_tokens: int,
               long_prompts: str = "error") -> list[list[int]]:
    """Token ids of the formatted prompts `texts` (one per example); an over-long one is an
    error, or (long_prompts="truncate") keeps its last `max_tokens` tokens."""
    ids = []
    for text, ex in zip(texts, examples):
        p = tok(text, add_special_tokens=False).input_ids
        if len(p) > max_tokens:
            if long_prompts != "truncate":
                raise ValueError(
                    f"prompt of example {ex.get('id')} has {len(p)} tokens, more than "
                    f"data.max_prompt_tokens={max_tokens}; raise the limit, shorten the prompt, "
                    f"or pass --data.long-prompts truncate")
            p = p[-max_tokens:]
        ids.append(p)
    return ids


def decode(tok, tokens_NxT, lengths_N) -> list[str]:
    tokens_NxT, lengths_N = np.asarray(tokens_NxT), np.asarray(lengths_N)
    return tok.batch_decode([t[:n] for t, n in zip(tokens_NxT, lengths_N)], skip_special_tokens=True)


def select_groups(rewards_BxG: np.ndarray, want: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """(indices of the `want` groups to train on, per-group keep flag). "dynamic" prefers groups
    whose rewards differ (DAPO) and fills up with zero-std ones; "drop" keeps them in the batch
    with no loss; "keep" trains on everything."""
    zero = np.asarray(L.zero_std_groups(rewards_BxG))
    order = np.arange(len(zero))
    if mode == "dynamic":
        order = np.concatenate([np.flatnonzero(~zero), np.flatnonzero(zero)])
    idx = order[:want]
    keep = np.ones(want, bool) if mode == "keep" else ~zero[idx]
    return idx, keep


class GRPOTrainer:
    """Holds the compiled programs of one experiment. `step(state, ref_params, step)` runs one
    GRPO iteration and returns the new state and the (host) metrics of this step.

    With a `mesh`, pass the params through `init_state` and the reference params through
    `place_params` (both lay them out as `rules` say); `sample_rules` is the rollout's layout.
    `sample_mesh` (default: `mesh`) is where the rollouts run, e.g. `cpu_rollout_mesh()` while
    training stays on one device."""

    def __init__(self, exp: Experiment, cfg: ModelConfig, tok, task, *, mesh=None,
                 rules: sharding.Rules = sharding.TRAIN_RULES,
                 sample_rules: sharding.Rules = sharding.SAMPLE_RULES, sample_mesh=None):
        self.exp, self.cfg, self.tok, self.task = exp, cfg, tok, task
        self.mesh, self.rules = mesh, rules
        self.sample_mesh = mesh if sample_mesh is None else sample_mesh
        g = exp.grpo
        self.stop_ids = tuple(exp.sampler.stop_ids) or (tok.eos_token_id,)
        self.scfg = dataclasses.replace(exp.sampler, stop_ids=self.stop_ids)
        self.sampler = Sampler(cfg, self.scfg, pad_id=tok.pad_token_id, mesh=self.sample_mesh,
                               rules=sample_rules)
        self.reuse_rollout = g.mu * g.minibatches > 1  # then old log-probs must be stored
        updates = exp.steps * g.mu * g.minibatches
        self.tx = make_optimizer(exp.optim, max(updates, 1))
        self.lr = lr_schedule(exp.optim, max(updates, 1))
        self.rewards = {name: w for name, w in exp.rewards.weights}
        for name in self.rewards:
            get_reward(name)  # fail now, not at the first step, on a misspelled name
        self.state_sharding = self.batch_sharding = None
        if mesh is None:
            self._score = jax.jit(self._score_fn)
            self._update = jax.jit(self._update_fn, donate_argnums=(0,))
        else:
            self.batch_sharding = sharding.batch_sharding(mesh, rules)
            shards = sharding.batch_parallelism(mesh, rules)
            if exp.prompts_per_step % shards:
                raise ValueError(f"prompts_per_step: {exp.prompts_per_step} prompts do not split "
                                 f"over the mesh's {shards} batch shards (mesh axes "
                                 f"{self.batch_sharding.spec[0]})")
            params_sh = sharding.param_shardings(cfg, mesh, rules)
            self.state_sharding = TrainState(
                params=params_sh, step=sharding.replicated(mesh),
                opt_state=sharding.opt_state_shardings(self.tx, params_sh, model.param_shapes(cfg)))
            # Explicit output shardings: the state keeps its layout step after step, so that the
            # donated input buffers are reused and the next call does not recompile.
            self._score = jax.jit(sharding.under_rules(self._score_fn, mesh, rules),
                                  out_shardings=self.batch_sharding)
            self._update = jax.jit(sharding.under_rules(self._update_fn, mesh, rules),
                                   donate_argnums=(0,),
                                   out_shardings=(self.state_sharding, sharding.replicated(mesh)))
        # Named PRNG streams; a step's key is fold_in(stream, step), so resuming at a step
        # reproduces its samples. The data stream is the task's own seed: seed * 1_000_003 + step.
        self.keys = dict(zip(("rollout", "update"), jax.random.split(jax.random.key(exp.seed), 2)))

    # ------------------------------------------------------------------ jitted programs

    def _logprobs(self, params, batch, return_entropy=False):
        """Completion log-probs [b*G, T] of a group-major batch: each prompt runs once for its G
        completions (`model.grouped_logprobs`)."""
        flat = lambda x: x.reshape(-1, *x.shape[2:])
        return model.grouped_logprobs(params, batch["prompt"], batch["prompt_mask"],
                                      flat(batch["comp"]), flat(batch["gen_mask"]), self.cfg,
                                      group_size=self.exp.grpo.group_size,
                                      return_entropy=return_entropy)

    def _score_fn(self, params, batch):
        """Completion log-probs [B, G, T] under `params` (no gradient is ever taken of this),
        computed `optim.micro_batches` groups of prompts at a time, like the update."""
        k = self.exp.optim.micro_batches
        one = lambda mb: self._logprobs(params, mb).reshape(mb["comp"].shape)
        if k == 1:
            return one(batch)
        micro = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), batch)
        return jax.lax.map(one, micro).reshape(batch["comp"].shape)

    def init_state(self, params) -> TrainState:
        """The training state of `params`; on a mesh placed in the training layout, the optimizer
        state created already sharded."""
        if self.mesh is None:
            return TrainState(params=params, opt_state=self.tx.init(params), step=jnp.int32(0))
        sh = self.state_sharding
        params = self.place_params(params)
        return TrainState(params=params,
                          opt_state=jax.jit(self.tx.init, out_shardings=sh.opt_state)(params),
                          step=sharding.place(np.int32(0), sh.step))

    def state_shapes(self) -> TrainState:
        """Shapes, dtypes and (on a mesh) shardings of the state: a checkpoint restore target."""
        params = model.param_shapes(self.cfg)
        shapes = TrainState(params=params, opt_state=jax.eval_shape(self.tx.init, params),
                            step=jax.ShapeDtypeStruct((), jnp.int32))
        if self.mesh is None:
            return shapes
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_sharding)

    def place_params(self, params):
        """`params` (host or device arrays) in the training layout, e.g. the reference model's;
        unchanged without a mesh."""
        if self.mesh is None:
            return params
        return sharding.place(params, self.state_sharding.params)

    def _loss_fn(self, params, mb, weight):
        """The GRPO loss of a group-major minibatch (arrays [b, G, ...], prompts [b, P])."""
        g, t = self.exp.grpo, self.scfg.max_new_tokens
        logps, ent = self._logprobs(params, mb, return_entropy=True)
        rows = {k: v.reshape(-1, *v.shape[2:]) for k, v in mb.items()
                if k not in ("prompt", "prompt_mask")}
        mb = rows
        old = mb["old_logps"] if self.reuse_rollout else jax.lax.stop_gradient(logps)
        loss, metrics = L.grpo_loss(
            logps, old, mb.get("ref_logps"), mb["adv"], mb["loss_mask"], eps_low=g.eps_low,
            eps_high=g.eps_high, beta=g.kl_coef, kl_estimator=g.kl_estimator,
            ratio_level=g.ratio_level, aggregation=g.aggregation, max_completion_len=t)
        m = mb["gen_mask"].astype(jnp.float32)
        denom = jnp.maximum(m.sum(), 1.0)
        metrics["entropy"] = jnp.sum(jax.lax.stop_gradient(ent) * m) / denom
        # How far the trainer's log-probs are from the sampler's (same params, different program)
        metrics["logp_gap_sampler"] = jnp.sum(
            jnp.abs(jax.lax.stop_gradient(logps) - mb["sampler_logps"]) * m) / denom
        return loss * weight, metrics

    def _minibatch(self, state: TrainState, mb):
        """One optimizer update from a minibatch, accumulating over micro-batches."""
        k = self.exp.optim.micro_batches
        micro = jax.tree.map(lambda x: x.reshape(k, x.shape[0] // k, *x.shape[1:]), mb)
        if self.exp.grpo.aggregation == "token_mean":
            # DAPO normalizes by the tokens of the whole minibatch: weight each micro-batch by
            # its share, so that accumulation gives exactly the one-batch gradient.
            tok = micro["loss_mask"].reshape(k, -1).sum(1).astype(jnp.float32)
            weights = tok / jnp.maximum(tok.sum(), 1.0)
        else:
            weights = jnp.full((k,), 1.0 / k)
        grad_fn = jax.value_and_grad(self._loss_fn, has_aux=True)

        def acc(carry, xs):
            mbi, w = xs
            (l, metrics), grads = grad_fn(state.params, mbi, w)
            carry = jax.tree.map(jnp.add, carry, grads)
            return carry, (l, metrics)

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        grads, (losses, metrics) = jax.lax.scan(acc, zeros, (micro, weights))
        metrics = jax.tree.map(jnp.mean, metrics)
        metrics["loss"] = losses.sum()
        metrics["grad_norm"] = optax.tree.norm(grads)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss or gradient skips the update: parameters, optimizer moments and the
        # step stay as they were, and the metric says so (the runner counts faults in a row).
        ok = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        metrics["nonfinite_update"] = (~ok).astype(jnp.float32)
        return TrainState(params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
                          step=state.step + ok.astype(state.step.dtype)), metrics

    def _update_fn(self, state: TrainState, batch, key):
        """mu epochs over the rollout, each split into minibatches of whole groups (so that each
        prompt runs once per minibatch); every array of `batch` leads with the group axis B."""
        g = self.exp.grpo
        n = batch["adv"].shape[0]

        def epoch(state, k):
            perm = jax.random.permutation(k, n) if g.minibatches > 1 else jnp.arange(n)
            shuffled = jax.tree.map(
                lambda x: x[perm].reshape(g.minibatches, n // g.minibatches, *x.shape[1:]), batch)
            return jax.lax.scan(self._minibatch, state, shuffled)

        state, metrics = jax.lax.scan(epoch, state, jax.random.split(key, g.mu))
        skipped = metrics.pop("nonfinite_update").sum()
        return state, {**jax.tree.map(jnp.mean, metrics), "skipped_updates": skipped}

    # ------------------------------------------------------------------ one step

    def step(self, state: TrainState, ref_params, step: int) -> tuple[TrainState, dict, dict]:
        """One GRPO iteration. Returns (state, device metrics (fetch later), host metrics)."""
        exp, g = self.exp, self.exp.grpo
        t0 = time.perf_counter()
        b = exp.prompts_per_step
        n_prompts = math.ceil(b * g.dynamic_oversample) if g.zero_std == "dynamic" else b
        examples = self.task.train(n_prompts, seed=exp.seed * 1_000_003 + step)
        prompts_text = [format_prompt(ex, exp.data.template, self.tok) for ex in examples]
        ids = prompt_ids(self.tok, prompts_text, examples, exp.data.max_prompt_tokens,
                         exp.data.long_prompts)
        p_tok, p_mask = pad_prompts(ids, bucket=self.scfg.prompt_bucket, pad_id=self.tok.pad_token_id)
        with jax.named_scope("rollout"):
            out = self.sampler(state.params, p_tok, p_mask,
                               jax.random.fold_in(self.keys["rollout"], step), group_size=g.group_size)
            out = sharding.to_host(out)
            self.sampler.forget_weights()  # the update changes the params
        t_roll = time.perf_counter() - t0

        lr = float(self.lr(int(state.step)))
        batch, host, logps_ok = host_batch(exp, self.scfg, self.tok, self.rewards, step, examples,
                                           prompts_text, out, p_tok, p_mask, lr)
        t1 = time.perf_counter()
        # Non-finite sampler log-probs mean the policy itself is broken: no update from them.
        if logps_ok:
            if self.mesh is not None:
                batch = sharding.place(batch, self.batch_sharding)
            with jax.named_scope("score"):
                if g.uses_reference:
                    batch["ref_logps"] = self._score(ref_params, batch)
                if self.reuse_rollout:
                    batch["old_logps"] = self._score(state.params, batch)
            state, dev_metrics = self._update(state, batch,
                                              jax.random.fold_in(self.keys["update"], step))
            # Wait for the update (the next rollout needs its parameters anyway) so that the
            # step's timings are its own; the metric values are still fetched later.
            jax.block_until_ready(state.params)
        else:
            dev_metrics = {"skipped_updates": float(g.mu * g.minibatches)}
        t2 = time.perf_counter()
        host.update(rollout_s=t_roll, update_s=t2 - t1, step_s=t2 - t0,
                    rollout_tokens_per_s=float(out.lengths.sum()) / max(t_roll, 1e-9),
                    train_tokens_per_s=float(batch["gen_mask"].sum()) / max(t2 - t1, 1e-9))
        return state, dev_metrics, host


def host_batch(exp: Experiment, scfg: SamplerConfig, tok, rewards: dict, step: int,
               examples: list[Example], prompts_text: list[str], out, p_tok, p_mask, lr: float):
    """The host half of a GRPO step on a rollout `out` (host arrays): rewards, group selection,
    advantages, masks -> (group-major update batch, host metrics, sampler log-probs finite).
    The timing metrics are left as None for the caller to fill in."""
    g, b, n_prompts = exp.grpo, exp.prompts_per_step, len(examples)
    completions = decode(tok, out.tokens, out.lengths)
    rep = lambda xs: [x for x in xs for _ in range(g.group_size)]
    fields = {k: rep([ex.get(k) for ex in examples]) for k in examples[0]}
    fields["completion_length"] = [int(x) for x in out.lengths]
    scored = score_completions(rep(prompts_text), completions, fields, rewards,
                               on_error=exp.rewards.on_error)
    total = scored.total.astype(np.float32)
    if g.overlong_cache:
        total = total + np.array([overlong_penalty(int(x), scfg.max_new_tokens, g.overlong_cache)
                                  for x in out.lengths], np.float32)
    rewards_BxG = total.reshape(n_prompts, g.group_size)
    idx, keep = select_groups(rewards_BxG, b, g.zero_std)
    rows = (idx[:, None] * g.group_size + np.arange(g.group_size)).reshape(-1)
    adv = np.asarray(L.compute_advantages(rewards_BxG[idx], g.adv_norm, eps=g.adv_eps,
                                          std_ddof=g.std_ddof)).reshape(-1)
    gen_mask = out.mask[rows]
    loss_mask = gen_mask & np.repeat(keep, g.group_size)[:, None]
    if g.mask_truncated:
        loss_mask = loss_mask & ~out.truncated[rows][:, None]

    # Group-major arrays: [B, G, ...] per completion, [B, P] per prompt.
    grp = lambda x: x.reshape(b, g.group_size, *x.shape[1:])
    batch = dict(prompt=p_tok[idx], prompt_mask=p_mask[idx], comp=grp(out.tokens[rows]),
                 gen_mask=grp(gen_mask), loss_mask=grp(loss_mask),
                 adv=grp(adv.astype(np.float32)), sampler_logps=grp(out.logps[rows]))
    logps_ok = bool(np.isfinite(np.where(gen_mask, out.logps[rows], 0.0)).all())
    lengths = out.lengths[rows]
    host = {
        "step": step + 1,
        "reward": float(total[rows].mean()), "reward_std": float(total[rows].std()),
        **{f"reward/{k}": float(v[rows].mean()) for k, v in scored.per_reward.items()},
        **{f"reward_failures/{k}": int(v) for k, v in scored.failures.items() if v},
        "response_length": float(lengths.mean()), "response_length_max": int(lengths.max()),
        "truncated_frac": float(out.truncated[rows].mean()),
        "zero_std_frac": float(np.asarray(L.zero_std_groups(rewards_BxG)).mean()),
        "nonfinite_logps": int(not logps_ok), "lr": lr,
        "rollout_s": None, "update_s": None, "step_s": None, "rollout_tokens_per_s": None,
        "train_tokens_per_s": None,
    }
    if "accuracy" in scored.per_reward:
        host["accuracy"] = float(scored.per_reward["accuracy"][rows].mean())
    if "format" in scored.per_reward:
        host["format_rate"] = float(scored.per_reward["format"][rows].mean())
    host["_samples"] = [{"step": step + 1, "prompt": prompts_text[i // g.group_size],
                         "completion": completions[i], "reward": float(total[i])}
                        for i in rows[: exp.log.num_samples]]
    return batch, host, logps_ok


def finish_metrics(dev_metrics: dict, host: dict) -> dict:
    """One metrics line: the host metrics and the device ones, fetched one step late."""
    m = {k: float(v) for k, v in jax.device_get(dev_metrics).items()}
    return {**{k: v for k, v in host.items() if not k.startswith("_")}, **m}
