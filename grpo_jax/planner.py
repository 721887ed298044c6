"""Memory planner: the per-device bytes of a GRPO run, known before anything is compiled.

Out-of-memory is what users of GRPO codebases hit most (SPEC.md section 8): policy, optimizer,
reference and the rollout's KV cache share one device, and the update's activations grow with
the group size and the completion length. `plan_memory` adds up what each jitted program holds,
per device, from the config alone (no devices, no weights), `check_fits` refuses a config that
cannot fit and says which knobs would make it fit, and `grpo-jax plan` prints the table.

What is alive when (the runner's loop, grpo_jax/trainer.py):

- resident, all run long: parameters, AdamW's two moments (param dtype), the reference
  parameters when beta > 0, and the rollout's KV cache: the `Sampler` keeps its donated buffer
  between steps, so it is also alive during the score and update programs.
- rollout: the parameters again in the decoding layout (`split_layers` copies every weight, and
  the layout is resharded without FSDP; on the CPU, `model.decode_layout`'s transposed copy,
  which the trainer's sampler drops after each rollout), the prefill's logits and one layer's
  working set, and the cache window the decode works on besides the kept buffer (up to the
  last but one of `SamplerConfig.cache_windows`' windows: `sampler.cache_windows`).
- score: reference (and old) log-probs, one micro-batch of prompts at a time, no gradients.
- update: the batch, the gradient accumulator + one micro-batch's gradients, the saved
  activations and the chunked logits of one micro-batch.
- eval: the two evaluation samplers' KV caches (k samples and greedy per prompt) and their
  parameter copy, beside the resident state.

The total is the resident bytes plus the largest phase.

Activations (per micro-batch of b prompts, n = b G completion rows, P prompt and T completion
tokens, one layer; c = compute-dtype bytes; the prompt runs once for its G rows, so each term is
taken for (b rows, P queries, P keys) and for (n rows, T queries, P + T keys)). These are the
residuals JAX saves for the backward pass of `model.grouped_logprobs`'s layer (read off
`jax.ad_checkpoint.print_saved_residuals`):

    per token:     D (3 * 4 + 2 c)      two RMSNorm outputs and the post-attention residual in
                                        float32, the two normed inputs in the compute dtype
                 + F 6 c                gate projection, SiLU (3 values), up, gate * up
                 + H Hd 2 c             queries and attention output
                 + 8 Hd                 RoPE cos / sin (float32, half the head dim, q and k)
                 + (H + K) Hd 4         (qk_norm only) normed queries and keys in float32
    per row/key:   K Hd 2 c             keys and values, head-major
    per score:     H (1 + 4 + 4 + c)    mask, masked scores and exp in float32, probabilities

Without remat all layers' residuals are alive when the backward starts (num_layers x the
above). With remat and scanned layers only each layer's input is saved ([rows, L, D] float32
per layer). Where a layer's backward gets all its residuals at once (recomputed under remat, or
sliced out of the scan's stacked residuals), it also holds the cotangents of the attention
scores and probabilities (2 x float32) and of the residual stream in and out: that working set
starts once the logits' buffers are freed, so only its excess over them adds. With unrolled
layers (`scan_layers` off, the default below 8 layers) remat saves next to nothing:
`model._over_layers` checkpoints with prevent_cse=False, and XLA merges the recomputation back
into the forward pass (the tiny model's update: 163 -> 156 MiB unrolled, 200 -> 77 MiB
scanned); the plan says so.

Logits: `model.logprobs_from_hidden` recomputes [n, chunk, V] float32 logits chunk by chunk
(chunk = min(logits_chunk, T)); the backward of a chunk holds the logits, the log-softmax and
its cotangent (3 such arrays), plus three [n, T, D] float32 copies of the final hidden states.
The score program runs one micro-batch at a time without gradients: one layer's forward or one
[N, chunk, V] float32 logits chunk, whichever is larger.

Sharding: weights divide by the mesh axes their logical axes map to (TRAIN_RULES for the
state, SAMPLE_RULES for the sampler's copy); a dim that an axis does not divide is counted
rounded up and noted. Activations divide their batch dim by the rules' "batch" axes (the
longest prefix that divides it, as `sharding.activation_sharding` does) and their head, MLP and
vocabulary dims by the axes of "q_heads", "kv_heads", "mlp", "vocab"; the residual stream is
replicated over "tensor". XLA may fuse away some residuals and adds small temporaries of its
own: the update program's estimate is within 25% of XLA's memory analysis for the tiny model
(tests/test_planner.py has the numbers).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from grpo_jax.config import Experiment, ModelConfig
from grpo_jax.sharding import SAMPLE_RULES, TRAIN_RULES, Rules

GiB, MiB = 2**30, 2**20
USABLE_FRACTION = 0.9  # of the device's memory: the rest for XLA's own buffers and fragmentation
PHASES = ("rollout", "score", "update", "eval")
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
LOGITS_LIVE = 3  # [rows, chunk, V] float32 arrays in a chunk's backward: logits, log-softmax, cotangent

# Nominal accelerator memory (GiB), for `grpo-jax plan --device NAME`.
DEVICE_GIB: dict[str, float] = {
    "h100": 80, "h200": 141, "a100-40": 40, "a100-80": 80,
    "tpu-v4": 32, "tpu-v5e": 16, "tpu-v5p": 95, "tpu-v6e": 32,
}


class MemoryPlanError(ValueError):
    """The plan exceeds the device's memory; the message holds the table and the advice."""


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Item:
    key: str  # stable name: params, opt_state, ref_params, kv_cache, grads, activations, ...
    label: str  # what the table shows
    bytes: int  # per device
    phase: str  # "resident" or one of PHASES
    detail: str = ""  # the shape behind the number


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-device bytes of every item; `total` = resident + the largest phase."""

    items: tuple[Item, ...]
    mesh_shape: tuple[tuple[str, int], ...]
    micro_batch_prompts: int  # prompts per micro-batch (per step, all devices)
    notes: tuple[str, ...] = ()

    def __getitem__(self, key: str) -> int:
        """Bytes of the items named `key` (0 when the plan has none, e.g. no reference)."""
        return sum(i.bytes for i in self.items if i.key == key)

    def phase_bytes(self, phase: str) -> int:
        """Resident bytes plus the items of `phase`."""
        return sum(i.bytes for i in self.items if i.phase in ("resident", phase))

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase_bytes)

    @property
    def total(self) -> int:
        return self.phase_bytes(self.peak_phase)

    def fits(self, device_bytes: int, usable: float = USABLE_FRACTION) -> bool:
        return self.total <= usable * device_bytes

    def table(self, device_bytes: int | None = None, usable: float = USABLE_FRACTION) -> str:
        mesh = " x ".join(f"{n}={s}" for n, s in self.mesh_shape) or "one device"
        rows = [(i.label, i.phase, fmt_bytes(i.bytes), i.detail) for i in self.items]
        rows.append(("", "", "", ""))
        for ph in PHASES:
            mark = "<- peak" if ph == self.peak_phase else ""
            rows.append((f"resident + {ph}", "", fmt_bytes(self.phase_bytes(ph)), mark))
        rows.append(("total (peak)", self.peak_phase, fmt_bytes(self.total), ""))
        if device_bytes is not None:
            room = usable * device_bytes - self.total
            rows.append(("device memory", "", fmt_bytes(device_bytes), ""))
            rows.append((f"usable ({usable:.0%})", "", fmt_bytes(int(usable * device_bytes)), ""))
            rows.append(("headroom" if room >= 0 else "over by", "", fmt_bytes(int(abs(room))),
                         "fits" if room >= 0 else "DOES NOT FIT"))
        w = [max(len(r[k]) for r in rows) for k in range(3)]
        lines = [f"memory plan per device ({mesh}; {self.micro_batch_prompts} prompts per "
                 f"micro-batch)",
                 f"  {'item':<{w[0]}}  {'phase':<{w[1]}}  {'bytes':>{w[2]}}  shape"]
        for label, phase, size, detail in rows:
            lines.append(f"  {label:<{w[0]}}  {phase:<{w[1]}}  {size:>{w[2]}}  {detail}".rstrip())
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def fmt_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.2f} MiB"


# ----------------------------------------------------------------------------- sharding sizes


def _mesh_axes(rules: Rules, name: str | None) -> tuple[str, ...]:
    axes = dict(rules).get(name) if name is not None else None
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def shard_ways(n: int, name: str | None, rules: Rules, mesh_shape: dict[str, int]) -> int:
    """Into how many parts an activation dim of size `n` with logical axis `name` is split: the
    longest prefix of its mesh axes whose product divides `n` (`sharding.activation_sharding`)."""
    ways = 1
    for m in _mesh_axes(rules, name):
        if n % (ways * mesh_shape.get(m, 1)):
            break
        ways *= mesh_shape.get(m, 1)
    return ways


def _per_device(n: int, name: str | None, rules: Rules, mesh_shape: dict[str, int]) -> int:
    return n // shard_ways(n, name, rules, mesh_shape)


def weight_bytes(cfg: ModelConfig, mesh_shape: dict[str, int], rules: Rules,
                 notes: list[str] | None = None) -> int:
    """Per-device bytes of the weights (`model.param_axes` under `rules`); a dim that its mesh
    axes do not divide is counted rounded up (and noted: `param_shardings` refuses it)."""
    from grpo_jax import model

    itemsize = _BYTES[cfg.param_dtype]
    total = 0

    def walk(axes, shapes, path):
        nonlocal total
        if isinstance(axes, dict):
            for k in axes:
                walk(axes[k], shapes[k], f"{path}.{k}" if path else k)
            return
        count = 1
        for dim, (name, n) in enumerate(zip(axes, shapes.shape)):
            parts = math.prod(mesh_shape.get(m, 1) for m in _mesh_axes(rules, name))
            if n % parts and notes is not None:
                notes.append(f"{path} dim {dim} ({name}={n}) is not divisible by its mesh axes "
                             f"({parts} ways); sharding.param_shardings will refuse this mesh")
            count *= -(-n // parts)
        total += count * itemsize

    walk(model.param_axes(cfg), model.param_shapes(cfg), "")
    return total


# ----------------------------------------------------------------------------- activations


@dataclasses.dataclass(frozen=True)
class _Dims:
    """Per-device model dims of the activations (heads, MLP and vocabulary over "tensor")."""

    d: int
    f: int
    h: int
    k: int
    hd: int
    v: int
    c: int  # compute-dtype bytes
    qk_norm: bool

    @classmethod
    def of(cls, cfg: ModelConfig, rules: Rules, mesh_shape: dict[str, int]) -> _Dims:
        dev = lambda n, name: _per_device(n, name, rules, mesh_shape)
        return cls(d=cfg.hidden_size, f=dev(cfg.intermediate_size, "mlp"),
                   h=dev(cfg.num_heads, "q_heads"), k=dev(cfg.num_kv_heads, "kv_heads"), hd=cfg.hd,
                   v=dev(cfg.vocab_size, "vocab"), c=_BYTES[cfg.compute_dtype], qk_norm=cfg.qk_norm)


def layer_residual_bytes(dm: _Dims, rows: int, queries: int, keys: int) -> int:
    """Bytes one decoder layer saves for its backward pass (the module docstring's formula) on
    `rows` sequences of `queries` tokens attending over `keys` keys."""
    c = dm.c
    per_token = dm.d * (3 * 4 + 2 * c) + dm.f * 6 * c + dm.h * dm.hd * 2 * c + 8 * dm.hd
    if dm.qk_norm:
        per_token += (dm.h + dm.k) * dm.hd * 4
    kv = dm.k * keys * dm.hd * 2 * c
    scores = dm.h * queries * keys * (1 + 4 + 4 + c)
    return rows * (queries * per_token + kv + scores)


def layer_forward_bytes(dm: _Dims, rows: int, queries: int, keys: int) -> int:
    """Peak bytes of one layer's forward pass without gradients (nothing saved): the larger of
    the attention (scores and probabilities in float32, keys and values, queries and output)
    and the MLP (gate, up, their product), plus the residual stream in and out (float32)."""
    c = dm.c
    attn = rows * (dm.h * queries * keys * 2 * 4 + dm.k * keys * dm.hd * 2 * c
                   + queries * dm.h * dm.hd * 2 * c)
    mlp = rows * queries * dm.f * 3 * c
    return max(attn, mlp) + 2 * rows * queries * dm.d * 4


def _grouped_residuals(dm: _Dims, b: int, g: int, p: int, t: int) -> int:
    """One layer of `grouped_logprobs`: the b prompts once, then their b * g completions."""
    return layer_residual_bytes(dm, b, p, p) + layer_residual_bytes(dm, b * g, t, p + t)


def _layer_cotangents(dm: _Dims, b: int, g: int, p: int, t: int, d: int) -> int:
    """What a layer's backward holds beside its residuals: the cotangents of the attention
    probabilities and scores (float32) and of the residual stream in and out (float32)."""
    n = b * g
    scores = dm.h * (b * p * p + n * t * (p + t))
    return 2 * scores * 4 + 2 * (b * p + n * t) * d * 4


# ----------------------------------------------------------------------------- plan_memory


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def remat_effective(cfg: ModelConfig) -> bool:
    """Remat only saves memory over scanned layers (see the module docstring)."""
    return cfg.remat and cfg.use_scan


def plan_memory(exp: Experiment, cfg: ModelConfig, mesh_shape: dict[str, int] | None = None,
                rules: Rules = TRAIN_RULES, sample_rules: Rules = SAMPLE_RULES) -> Plan:
    """Per-device bytes of a GRPO run of `exp` with the policy `cfg` on a mesh of
    `mesh_shape` (axis name -> size; None or {}: one device). Pure arithmetic: no devices."""
    mesh = dict(mesh_shape or {})
    notes: list[str] = []
    g = exp.grpo
    G, T = g.group_size, exp.sampler.max_new_tokens
    B = exp.prompts_per_step
    P = _round_up(exp.data.max_prompt_tokens, exp.sampler.prompt_bucket)
    cb = _BYTES[cfg.compute_dtype]
    L = cfg.num_layers
    items: list[Item] = []

    def add(key, label, n, phase, detail=""):
        items.append(Item(key, label, int(n), phase, detail))

    # --- resident: state, reference, the sampler's KV cache
    params = weight_bytes(cfg, mesh, rules, notes=notes)
    add("params", f"parameters ({cfg.param_dtype})", params, "resident",
        f"{cfg.num_params / 1e6:,.1f}M params")
    add("opt_state", "AdamW moments (2x params)", 2 * params, "resident", f"2 x {cfg.param_dtype}")
    if g.uses_reference:
        add("ref_params", "reference parameters (beta > 0)", params, "resident", "like params")
    # DAPO dynamic sampling rolls out more prompts than it trains on (trainer.step).
    br = math.ceil(B * g.dynamic_oversample) if g.zero_std == "dynamic" else B
    kv_rows = _per_device(br * G, "batch", sample_rules, mesh)
    kv_heads = _per_device(cfg.num_kv_heads, "act_kv_heads", sample_rules, mesh)
    # The sampler keeps the generated tokens' cache ([rows, T] slots); each prompt's keys and
    # values are held once per group during the rollout (`model.grouped_decode`).
    kv_bytes = lambda rows, slots: 2 * L * rows * kv_heads * slots * cfg.hd * cb  # keys + values
    add("kv_cache", "KV cache (rollout, kept)", kv_bytes(kv_rows, T),
        "resident", f"2 x {L} x [{kv_rows}, {kv_heads}, {T}, {cfg.hd}] {cfg.compute_dtype}")

    # --- rollout: the decoding copy of the weights, the prefill, the decode step
    sdm = _Dims.of(cfg, sample_rules, mesh)
    add("sampler_params", "parameters, decoding layout", weight_bytes(cfg, mesh, sample_rules),
        "rollout", "split per layer" + ("" if mesh.get("fsdp", 1) == 1 else ", no FSDP"))
    from grpo_jax.sampler import cache_windows

    windows = cache_windows(T, exp.sampler.cache_windows)
    if len(windows) > 1:
        w = windows[-2]
        add("kv_window", "KV cache window (rollout)", kv_bytes(kv_rows, w),
            "rollout", f"{len(windows)} windows; the largest copy: 2 x {L} x "
            f"[{kv_rows}, {kv_heads}, {w}, {cfg.hd}]")
    bp = _per_device(br, "batch", sample_rules, mesh)
    add("rollout_work", "prefill working set", _prefill_bytes(cfg, sdm, bp, P, kv_heads),
        "rollout", f"logits [{bp}, {P}, {sdm.v}] f32 + one layer [{bp}, {P}] + the prompts' cache")

    # --- score: reference / old log-probs, one micro-batch of prompts at a time, no gradient
    tdm = _Dims.of(cfg, rules, mesh)
    bt = _per_device(B, "batch", rules, mesh)
    bs = max(bt // exp.optim.micro_batches, 1)
    chunk = min(cfg.logits_chunk, T)
    batch = _batch_bytes(exp, bt, P)
    if g.uses_reference or g.mu * g.minibatches > 1:
        add("score_batch", "batch (rollout results)", batch, "score", f"[{bt}, {G}, {T}] arrays")
        fwd = max(layer_forward_bytes(tdm, bs, P, P) + layer_forward_bytes(tdm, bs * G, T, P + T),
                  bs * G * chunk * tdm.v * 4)
        add("score_work", "score: one layer or logits", fwd + bs * G * T * cfg.hidden_size * 4,
            "score", f"{bs * G} rows at a time, logits [{bs * G}, {chunk}, {tdm.v}] f32")

    # --- update: gradients, activations and logits of one micro-batch
    add("batch", "batch (rollout results)", batch, "update", f"[{bt}, {G}, {T}] arrays")
    mb = B // (g.minibatches * exp.optim.micro_batches)
    b = _per_device(mb, "batch", rules, mesh)
    n = b * G
    add("grads", "gradients (accumulator + micro-batch)", 2 * params, "update",
        f"2 x {cfg.param_dtype}")
    one = _grouped_residuals(tdm, b, G, P, T)
    if remat_effective(cfg):
        act = L * (b * P + n * T) * cfg.hidden_size * 4
        how = f"remat: {L} layer inputs [{b}x{P} + {n}x{T}, {cfg.hidden_size}] f32"
    else:
        act, how = L * one, f"{L} layers' residuals, [{b}x{P} + {n}x{T}] tokens"
        if cfg.remat:
            notes.append("remat has no effect with unrolled layers (prevent_cse=False lets XLA "
                         "merge the recomputation); scanned layers (scan_layers True) make it work")
    add("activations", "activations saved for backward", act, "update", how)
    logits = LOGITS_LIVE * n * chunk * tdm.v * 4 + 3 * n * T * cfg.hidden_size * 4
    add("logits", "logits (one chunk, backward)", logits, "update",
        f"{LOGITS_LIVE} x [{n}, {chunk}, {tdm.v}] f32")
    if cfg.use_scan or remat_effective(cfg):
        # The layers' backward starts once the logits' buffers are freed: only the excess of
        # one layer's residuals (recomputed, or sliced out of the scan's stack) adds.
        back = one + _layer_cotangents(tdm, b, G, P, T, cfg.hidden_size)
        add("layer_backward", "one layer's backward (beyond logits)", max(0, back - logits),
            "update", f"one layer's residuals + cotangents {fmt_bytes(back)}")

    # --- eval: two samplers (k samples and greedy), each with its own cache
    be = min(exp.eval.batch_prompts, exp.data.eval_problems)
    rows_e = _per_device(be * exp.eval.samples, "batch", sample_rules, mesh) + \
        _per_device(be, "batch", sample_rules, mesh)
    add("eval_kv_cache", "eval KV caches (k samples + greedy)",
        kv_bytes(rows_e, T), "eval",
        f"2 x {L} x [{rows_e}, {kv_heads}, {T}, {cfg.hd}] {cfg.compute_dtype}")
    be_dev = _per_device(be, "batch", sample_rules, mesh)
    add("eval_work", "eval parameters copy + prefill", weight_bytes(cfg, mesh, sample_rules)
        + _prefill_bytes(cfg, sdm, be_dev, P, kv_heads), "eval",
        f"{be} prompts per eval batch")
    ways = math.prod(mesh.get(m, 1) for m in _mesh_axes(rules, "batch"))
    if B % ways:
        notes.append(f"prompts_per_step={B} does not split over the {ways} batch shards; "
                     "the trainer refuses this mesh")
    return Plan(items=tuple(items), mesh_shape=tuple(mesh.items()), micro_batch_prompts=mb,
                notes=tuple(dict.fromkeys(notes)))


def _prefill_bytes(cfg: ModelConfig, dm: _Dims, b: int, p: int, kv_heads: int) -> int:
    """The prefill of b prompts (per device): float32 logits [b, p, V] (an upper bound: the
    sampler keeps the last position's), one layer's forward over the p prompt slots, and the
    prompts' own cache, which the decode steps read for every row of their group (the steps
    themselves hold far less: [rows, V] logits)."""
    prompt_cache = 2 * cfg.num_layers * b * kv_heads * p * cfg.hd * dm.c
    return b * p * dm.v * 4 + layer_forward_bytes(dm, b, p, p) + prompt_cache


def _batch_bytes(exp: Experiment, b: int, p: int) -> int:
    """The update's inputs per device: prompts [b, P] (int32 + bool mask), completions
    [b, G, T] (int32 tokens, two bool masks, float32 sampler log-probs, + reference and old
    log-probs when used), advantages [b, G]."""
    g = exp.grpo
    n, t = b * g.group_size, exp.sampler.max_new_tokens
    f32_rows = 1 + g.uses_reference + (g.mu * g.minibatches > 1)
    return b * p * 5 + n * t * (4 + 2 + 4 * f32_rows) + n * 4


# ----------------------------------------------------------------------------- fitting


def largest_micro_batch(exp: Experiment, cfg: ModelConfig, mesh_shape: dict[str, int] | None,
                        device_bytes: int, usable: float = USABLE_FRACTION, *,
                        rules: Rules = TRAIN_RULES, sample_rules: Rules = SAMPLE_RULES) -> int | None:
    """The most prompts per micro-batch whose plan fits (then `optim.micro_batches` =
    prompts_per_step / (grpo.minibatches x it)), or None when even one prompt does not."""
    per_minibatch = exp.prompts_per_step // exp.grpo.minibatches
    for m in sorted((m for m in range(1, per_minibatch + 1) if per_minibatch % m == 0), reverse=True):
        trial = _with(exp, optim={"micro_batches": per_minibatch // m})
        if plan_memory(trial, cfg, mesh_shape, rules, sample_rules).fits(device_bytes, usable):
            return m
    return None


@dataclasses.dataclass(frozen=True)
class Advice:
    """One knob (or a combination), re-planned: `flags` for `grpo-jax run`, and the plan."""

    flags: str  # command-line flags, or "mesh data=..,fsdp=.." for a different mesh
    note: str  # what the flags mean, e.g. "4 prompts per micro-batch"
    plan: Plan
    fits: bool
    exp: Experiment
    cfg: ModelConfig
    mesh_shape: dict[str, int]

    def __str__(self) -> str:
        note = f" ({self.note})" if self.note else ""
        verdict = "fits" if self.fits else "not enough" + ("" if self.note == "together" else " alone")
        return f"{self.flags}{note}: {fmt_bytes(self.plan.total)} ({verdict})"


# A knob maps (exp, cfg, mesh, rules) to its candidate changes, mildest first, each
# ((flags, note), exp, cfg, mesh). Invalid candidates (the config dataclasses refuse) are skipped.
Choice = tuple[tuple[str, str], Experiment, ModelConfig, dict]


def _candidates(values, flags, make) -> list[Choice]:
    out = []
    for v in values:
        try:
            out.append((flags(v), *make(v)))
        except ValueError:  # e.g. a batch that no longer splits into the micro-batches
            continue
    return out


def _knob_micro_batches(exp, cfg, mesh, rules) -> list[Choice]:
    per_minibatch = exp.prompts_per_step // exp.grpo.minibatches
    ks = [k for k in range(exp.optim.micro_batches + 1, per_minibatch + 1) if per_minibatch % k == 0]
    return _candidates(ks, lambda k: (f"--optim.micro-batches {k}",
                                      f"{_prompts(per_minibatch // k)} per micro-batch"), lambda k: (_with(exp, optim={"micro_batches": k}), cfg, mesh))


def _knob_remat(exp, cfg, mesh, rules) -> list[Choice]:
    if remat_effective(cfg) or not (cfg.use_scan or exp.model.init is not None):
        return []
    flags = "--model.remat True" + ("" if cfg.use_scan else " --model.init.scan-layers True")
    return [((flags, "rematerialize each layer"), _with(exp, model={"remat": True}),
             dataclasses.replace(cfg, remat=True, scan_layers=True), mesh)]


def _model_flag(exp) -> str:
    return "--model.init." if exp.model.init is not None else "--model."


def _knob_param_dtype(exp, cfg, mesh, rules) -> list[Choice]:
    if cfg.param_dtype != "float32":
        return []
    # A Hugging Face model's compute dtype follows its param dtype unless set (hf_io).
    both = exp.model.init is None and exp.model.compute_dtype is None
    new = dataclasses.replace(cfg, param_dtype="bfloat16",
                              compute_dtype="bfloat16" if both else cfg.compute_dtype)
    return [((f"{_model_flag(exp)}param-dtype bfloat16", "weights, moments, gradients"), exp, new,
             mesh)]


def _knob_compute_dtype(exp, cfg, mesh, rules) -> list[Choice]:
    if cfg.compute_dtype != "float32":
        return []
    return [((f"{_model_flag(exp)}compute-dtype bfloat16", "activations, KV cache"), exp,
             dataclasses.replace(cfg, compute_dtype="bfloat16"), mesh)]


def _knob_fsdp(exp, cfg, mesh, rules) -> list[Choice]:
    """Move devices from the data axis to the fsdp axis (same devices, same batch split)."""
    data, fsdp = mesh.get("data", 1), mesh.get("fsdp", 1)
    moves = [2**i for i in range(1, data.bit_length()) if data % 2**i == 0]
    new = lambda f: {**mesh, "data": data // f, "fsdp": fsdp * f}
    return _candidates(moves, lambda f: ("mesh " + ",".join(f"{k}={v}" for k, v in new(f).items()),
                                         "more FSDP, same devices"),
                       lambda f: (exp, cfg, new(f)))


def _knob_group_size(exp, cfg, mesh, rules) -> list[Choice]:
    return _candidates(range(exp.grpo.group_size - 1, 1, -1), lambda v: (f"--grpo.group-size {v}", ""),
                       lambda v: (_with(exp, grpo={"group_size": v}), cfg, mesh))


def _knob_prompts(exp, cfg, mesh, rules) -> list[Choice]:
    return _candidates(range(exp.prompts_per_step - 1, 0, -1), lambda v: (f"--prompts-per-step {v}", ""),
                       lambda v: (_with_prompts(exp, v, mesh, rules), cfg, mesh))


def _knob_new_tokens(exp, cfg, mesh, rules) -> list[Choice]:
    return _candidates(_shrinking(exp.sampler.max_new_tokens),
                       lambda v: (f"--sampler.max-new-tokens {v}", ""),
                       lambda v: (_with(exp, sampler={"max_new_tokens": v}), cfg, mesh))


def _knob_no_reference(exp, cfg, mesh, rules) -> list[Choice]:
    if not exp.grpo.uses_reference:
        return []
    return [(("--grpo.kl-coef 0", "no reference model"), _with(exp, grpo={"kl_coef": 0.0}), cfg, mesh)]


def _knob_logits_chunk(exp, cfg, mesh, rules) -> list[Choice]:
    top = min(cfg.logits_chunk, exp.sampler.max_new_tokens)
    return _candidates([c for c in (512, 256, 128, 64, 32, 16) if c < top],
                       lambda v: (f"--model.logits-chunk {v}", ""),
                       lambda v: (exp, dataclasses.replace(cfg, logits_chunk=v), mesh))


def _knob_eval_batch(exp, cfg, mesh, rules) -> list[Choice]:
    return _candidates(_shrinking(exp.eval.batch_prompts), lambda v: (f"--eval.batch-prompts {v}", ""),
                       lambda v: (_with(exp, eval={"batch_prompts": v}), cfg, mesh))


# (knob, may be combined with others: it leaves the algorithm as it is). The order is the
# advice's; the combination applies the combinable ones in the order of _COMBINE.
_KNOBS = (
    (_knob_micro_batches, True), (_knob_remat, True), (_knob_param_dtype, True),
    (_knob_compute_dtype, True), (_knob_fsdp, True), (_knob_group_size, False),
    (_knob_prompts, False), (_knob_new_tokens, False), (_knob_no_reference, False),
    (_knob_logits_chunk, True), (_knob_eval_batch, True),
)
_COMBINE = (_knob_remat, _knob_micro_batches, _knob_param_dtype, _knob_compute_dtype, _knob_fsdp,
            _knob_logits_chunk, _knob_eval_batch)


def advise(exp: Experiment, cfg: ModelConfig, mesh_shape: dict[str, int] | None,
           device_bytes: int, usable: float = USABLE_FRACTION, *, rules: Rules = TRAIN_RULES,
           sample_rules: Rules = SAMPLE_RULES) -> list[Advice]:
    """Each knob that lowers the total, re-planned with that one change: more micro-batches,
    remat, bfloat16 weights / compute, more FSDP, smaller G / B / T, no reference, a smaller
    logits chunk, smaller eval batches; where a knob has a range, its mildest value that fits
    (else its strongest). Last, when no single knob fits, the knobs that leave the algorithm
    as it is, combined ("together: ..."), in the order remat, micro-batches, bfloat16, FSDP."""
    mesh = dict(mesh_shape or {})
    plan = lambda e, c, m: plan_memory(e, c, m, rules, sample_rules)
    fits = lambda ch: plan(*ch[1:]).fits(device_bytes, usable)

    def pick(cands: list[Choice]) -> Choice | None:
        return next((ch for ch in cands if fits(ch)), cands[-1] if cands else None)

    base = plan(exp, cfg, mesh).total
    out: list[Advice] = []
    for knob, _ in _KNOBS:
        ch = pick(knob(exp, cfg, mesh, rules))
        if ch is not None and plan(*ch[1:]).total < base:
            out.append(Advice(*ch[0], plan(*ch[1:]), fits(ch), *ch[1:]))
    if any(a.fits for a in out):
        return out
    state, flags = (exp, cfg, mesh), {}
    for knob in _COMBINE:
        ch = pick(knob(*state, rules))
        if ch is not None and plan(*ch[1:]).total < plan(*state).total:
            state, flags[knob] = ch[1:], ch[0]
        if fits(("",) + state):
            break
    if _knob_micro_batches in flags and fits(("",) + state):
        # The fewest micro-batches that still fit beside the other knobs.
        e = _with(state[0], optim={"micro_batches": exp.optim.micro_batches})
        ch = pick([(("", ""), e, *state[1:])] + _knob_micro_batches(e, *state[1:], rules))
        state, flags[_knob_micro_batches] = ch[1:], ch[0]
    flags = [f for f, _ in flags.values() if f]
    if len(flags) > 1:
        out.append(Advice(" ".join(flags), "together", plan(*state), fits(("",) + state), *state))
    return out


def advice(exp: Experiment, cfg: ModelConfig, mesh_shape: dict[str, int] | None,
           device_bytes: int, usable: float = USABLE_FRACTION, **kw) -> list[str]:
    """`advise` as lines: each knob with the new total and whether it fits alone."""
    return [str(a) for a in advise(exp, cfg, mesh_shape, device_bytes, usable, **kw)]


def check_fits(exp: Experiment, cfg: ModelConfig, mesh_shape: dict[str, int] | None = None,
               device_bytes: int | None = None, usable: float = USABLE_FRACTION, *,
               rules: Rules = TRAIN_RULES, sample_rules: Rules = SAMPLE_RULES) -> Plan:
    """The plan; raises `MemoryPlanError` (the table and the advice) when it needs more than
    `usable` x `device_bytes` (default: this process's first device, `device_memory_bytes`;
    no check where that is unknown, as on CPU)."""
    plan = plan_memory(exp, cfg, mesh_shape, rules, sample_rules)
    if device_bytes is None:
        device_bytes = device_memory_bytes()
    if device_bytes is None or plan.fits(device_bytes, usable):
        return plan
    tips = advise(exp, cfg, mesh_shape, device_bytes, usable, rules=rules, sample_rules=sample_rules)
    lines = [f"the run needs about {fmt_bytes(plan.total)} per device (peak: {plan.peak_phase}), "
             f"more than {usable:.0%} of the device's {fmt_bytes(device_bytes)}.",
             plan.table(device_bytes, usable), ""]
    raise MemoryPlanError("\n".join(lines + advice_lines(tips)))


def advice_lines(tips: list[Advice]) -> list[str]:
    """The advice as printed under a plan that does not fit."""
    lines = ["what would make it fit (each knob re-planned alone):"]
    lines += [f"  {a}" for a in tips] or ["  no knob lowers it; use more devices"]
    if tips and not any(a.fits for a in tips):
        lines.append("  none fits, alone or the algorithm-preserving ones together: lower G, B or "
                     "T as well, or use more devices")
    return lines


def device_memory_bytes() -> int | None:
    """Memory of the first accelerator as its allocator reports it (`bytes_limit`), or None
    (CPU, or a backend without memory stats). On GPUs this is already what JAX may take
    (XLA_PYTHON_CLIENT_MEM_FRACTION, 75% of the card by default), so `usable` on top of it is
    a margin for fragmentation and XLA's own buffers."""
    import jax

    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return None
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # some backends do not implement it
        return None
    return stats.get("bytes_limit")


def _with(exp: Experiment, **sections: dict[str, Any]) -> Experiment:
    """`exp` with fields of its sub-configs replaced (validated again by the dataclasses)."""
    return dataclasses.replace(exp, **{name: dataclasses.replace(getattr(exp, name), **fields)
                                       for name, fields in sections.items()})


def _with_prompts(exp: Experiment, b: int, mesh: dict[str, int], rules: Rules) -> Experiment:
    ways = math.prod(mesh.get(m, 1) for m in _mesh_axes(rules, "batch"))
    if b % ways:
        raise ValueError(f"prompts_per_step {b} does not split over {ways} batch shards")
    return dataclasses.replace(exp, prompts_per_step=b)


def _prompts(n: int) -> str:
    return f"{n} prompt" + ("s" if n != 1 else "")


def _shrinking(n: int) -> list[int]:
    """Candidate sizes below n, mildest first: n - n/8, n - 2n/8, ..., then halvings to 1."""
    out = [n * k // 8 for k in range(7, 0, -1)]
    while out and out[-1] > 1:
        out.append(out[-1] // 2)
    return [v for v in dict.fromkeys(out) if 1 <= v < n]


# ----------------------------------------------------------------------------- the model config


def model_config(exp: Experiment) -> ModelConfig:
    """The policy's `ModelConfig` as the runner builds it, without loading any weight: the init
    config, or the Hugging Face `config.json` of `model.path` (a local directory, or a hub id
    already in the local Hugging Face cache; nothing is downloaded)."""
    from grpo_jax import hf_io

    src = exp.model
    if src.init is not None:
        return src.apply(src.init)
    hf = json.loads(_hf_config_path(src.path).read_text())
    cfg = hf_io.config_from_hf(hf, param_dtype=src.param_dtype, compute_dtype=src.compute_dtype)
    return src.apply(cfg)


def _hf_config_path(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p}: no config.json in this directory (not a Hugging Face "
                                    "model directory)")
        return p / "config.json"
    if path.count("/") == 1 and not path.startswith((".", "/", "~")):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(path, "config.json")
        except Exception:  # no huggingface_hub, or a malformed id
            cached = None
        if isinstance(cached, str):
            return Path(cached)
        raise FileNotFoundError(
            f"{path}: no local directory of that name, and the hub id is not in the local Hugging "
            f"Face cache. The planner reads only config.json and never downloads; fetch the model "
            f"(or just its config.json) on a machine with a network and pass its directory with "
            f"--model.path DIR")
    raise FileNotFoundError(f"{path}: no such directory")


# ----------------------------------------------------------------------------- command line


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlanArgs:
    """Per-device memory plan of an experiment, from its config alone (no weights loaded, no
    devices needed). Other flags override the experiment, as in `grpo-jax run`. Exits 1 when
    the plan does not fit the given device.

    Known devices (nominal memory): h100 80 GiB, h200 141, a100-40 40, a100-80 80, tpu-v4 32,
    tpu-v5e 16, tpu-v5p 95, tpu-v6e 32."""

    device: str | None = None  # a known device name (see above), e.g. h100 or tpu-v5e
    device_memory_gib: float | None = None  # per device; overrides --device
    mesh: str | None = None  # axis sizes, e.g. data=2,fsdp=4,tensor=1; none: one device
    usable: float = USABLE_FRACTION  # share of the device's memory the plan may use


def parse_mesh(text: str | None) -> dict[str, int]:
    """"data=2,fsdp=4,tensor=1" -> {"data": 2, "fsdp": 4, "tensor": 1}."""
    if not text:
        return {}
    out = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        if not name.strip() or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(f"--mesh: {part!r} is not NAME=SIZE with SIZE >= 1 "
                             "(e.g. data=2,fsdp=4,tensor=1)")
        out[name.strip()] = int(size)
    return out


def device_bytes_of(name: str) -> int:
    key = name.lower().replace("_", "-")
    key = {"v4": "tpu-v4", "v5e": "tpu-v5e", "v5p": "tpu-v5p", "v6e": "tpu-v6e"}.get(key, key)
    if key not in DEVICE_GIB:
        raise ValueError(f"--device: unknown device {name!r}; known: {', '.join(DEVICE_GIB)} "
                         "(or pass --device-memory-gib)")
    return int(DEVICE_GIB[key] * GiB)


def plan_main(argv: list[str]) -> None:
    """`grpo-jax plan EXPERIMENT.py [--device h100 | --device-memory-gib 80] [--mesh
    data=2,fsdp=4,tensor=1] [--field.sub value ...]`."""
    import tyro

    from grpo_jax.runner import load_experiment

    if not argv or argv[0].startswith("-"):
        print("usage: grpo-jax plan experiments/NAME.py [--device h100 | --device-memory-gib 80] "
              "[--mesh data=2,fsdp=4,tensor=1] [overrides as in grpo-jax run]")
        if argv and argv[0] in ("-h", "--help"):
            tyro.cli(PlanArgs, args=["--help"], prog="grpo-jax plan EXPERIMENT.py",
                     config=(tyro.conf.FlagConversionOff,))
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    path, rest = argv[0], argv[1:]
    args, rest = tyro.cli(PlanArgs, args=rest, prog=f"grpo-jax plan {path}",
                          return_unknown_args=True, config=(tyro.conf.FlagConversionOff,))
    exp = tyro.cli(Experiment, default=load_experiment(path), args=rest,
                   prog=f"grpo-jax plan {path}",
                   config=(tyro.conf.FlagConversionOff, tyro.conf.AvoidSubcommands))
    try:
        mesh = parse_mesh(args.mesh)
        cfg = model_config(exp)
        if args.device_memory_gib is not None:
            device = int(args.device_memory_gib * GiB)
        elif args.device is not None:
            device = device_bytes_of(args.device)
        else:
            device = device_memory_bytes()
    except (ValueError, FileNotFoundError) as e:
        print(f"grpo-jax plan: {e}")
        raise SystemExit(2) from None
    plan = plan_memory(exp, cfg, mesh)
    print(f"{path}: {cfg.arch}, {cfg.num_params / 1e6:,.1f}M parameters ({cfg.param_dtype}, compute "
          f"{cfg.compute_dtype}, remat {cfg.remat}), {exp.prompts_per_step} prompts x "
          f"G={exp.grpo.group_size}, {exp.sampler.max_new_tokens} new tokens, "
          f"beta={exp.grpo.kl_coef}")
    print(plan.table(device, args.usable))
    if device is None:
        print("no device memory known (no accelerator here): pass --device h100 or "
              "--device-memory-gib 80 to check the fit")
        return
    m = largest_micro_batch(exp, cfg, mesh, device, args.usable)
    per_minibatch = exp.prompts_per_step // exp.grpo.minibatches
    if m is None:
        print("largest micro-batch that fits: none, not even 1 prompt per micro-batch")
    else:
        print(f"largest micro-batch that fits: {_prompts(m)} (--optim.micro-batches "
              f"{per_minibatch // m})")
    if not plan.fits(device, args.usable):
        print("\n".join(advice_lines(advise(exp, cfg, mesh, device, args.usable))))
        raise SystemExit(1)
