"""Decode throughput against the HBM roofline and GRPO update MFU, for Qwen2.5 shapes on one
accelerator (issue 5 item 6). Random-init weights (`model.init_params`), so nothing is downloaded.

Run on one H100 (or H200), from the repository root (`pip install -e ".[cuda]"` first if
jax has no CUDA backend there; PYTHONPATH=. imports this checkout's grpo_jax without an install):

    PYTHONPATH=. python scripts/bench_gpu.py --shape qwen2.5-0.5b --batch 64 128 256 \
        --prompt-len 128 --new-tokens 256 --train-batch 8 --train-len 1024 \
        --json runs/bench_gpu_qwen05b.json
    PYTHONPATH=. python scripts/bench_gpu.py --shape qwen2.5-1.5b --batch 64 128 256 \
        --prompt-len 128 --new-tokens 256 --train-batch 8 --train-len 1024 \
        --json runs/bench_gpu_qwen15b.json

Every (batch, T) pair and the update compile once (tens of seconds each on a GPU); the compile
times are printed. With a limit per command, split the work: `--train-batch 0` runs the decode
part only, `--skip-decode` the update only, and `export JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache`
lets a second run reuse the compiled programs. Add --remat if the 1.5B update runs out of memory
(the MFU formula stays the same). The CPU smoke test (tests/test_bench_gpu.py) runs
`--shape tiny` with small sizes.

Targets of the issue: decode at >= 60% of the HBM roofline for batch 64 and above
(`decode[*].roofline_fraction`), and the training update at >= 35% MFU (`train.mfu`, against
the bf16 matmul peak measured in this process; `train.mfu_nominal` against the datasheet).

What is measured, all in this one process:

- `hbm_bandwidth`: a jitted `x + 1` over a --bw-mib float32 array; (bytes read + written) /
  time, best of --repeats (each the mean of --inner calls back to back).
- `matmul_peak`: a jitted [n, n] @ [n, n] in --dtype (n = --peak-n): 2 n^3 / time, best of
  --repeats. The nominal figures of the device, when its name is in `NOMINAL` (dense bf16,
  no sparsity), are printed beside both.
- decode, for each --batch N (rows; N / --group prompts, each prefilled once): the `Sampler`
  with no stop ids, so every row generates exactly the new tokens, called with T = --new-tokens
  and with 2T (calls interleaved, median of --repeats each). One call runs T decode forwards,
  so t(2T) - t(T) is T decode steps without the prefill; `step_s` = (t(2T) - t(T)) / T.
  The roofline of the same T steps (cache slots P + T + 1 .. P + 2T attended, average context
  c = P + 1.5 T + 0.5) per step is

      roofline_s = (weight_bytes + kv_bytes(c)) / hbm_bandwidth
      weight_bytes = bytes of every weight one step reads: the layers, the final norm and the
                     unembedding matrix (the tied embedding counts once; an untied input
                     embedding only has N rows gathered and is not counted)
      kv_bytes(c)  = layers * 2 (k, v) * N * kv_heads * c * head_dim * cache dtype bytes

  and `roofline_fraction` = roofline_s / step_s. (Our sampler reads every cache slot, masked
  ones included, and writes float32 logits [N, V]: both are costs the roofline does not grant.
  `logits_bytes` gives the size of one step's logits; `compute_floor_s` = one step's matmul
  FLOPs / matmul_peak tells when a batch stops being memory-bound;
  `roofline_fraction_with_compute` divides the larger of the two floors by step_s.)
  `tokens_per_s` = N / step_s.
- train: `GRPOTrainer._update` (mu = 1, one minibatch, AdamW, clipping, beta = 0.04 with k3)
  on a synthetic group-major batch of R = --train-batch rows, B = R / G prompts of
  P_t = --train-prompt-len tokens, each row a completion of T_t = --train-len - P_t tokens
  (all real, all in the loss); median of --repeats calls after a warm-up. Model FLOPs:

      tokens    = B * P_t + R * T_t                 (each prompt runs once per group)
      dense     = 6 * N_ne * tokens,  N_ne = layers * (D * Hd * (2 H + 2 K) + 3 D F)
      attention = 12 * layers * H * Hd * pairs,     causal (query, key) pairs:
                  pairs = B * P_t (P_t + 1) / 2 + R * (T_t P_t + T_t (T_t + 1) / 2)
                  (for one row of length L: ~ 12 * layers * hidden * L^2 / 2)
      unembed   = 6 * D * V * R * T_t               (log-probs at the completion positions)
      MFU       = (dense + attention + unembed) / time / matmul_peak

  i.e. forward + backward = 3 x forward, masked attention counted as causal, no remat
  recomputation, norms / softmax / optimizer not counted.

One line per measurement goes to stdout; the last line is one JSON object (also --json OUT).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax import model as M
from grpo_jax.config import (Experiment, GRPOConfig, LogConfig, ModelConfig, ModelSource,
                             OptimConfig, SamplerConfig)
from grpo_jax.sampler import Sampler
from grpo_jax.trainer import GRPOTrainer

SHAPES = {
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_layers=24, num_heads=14, num_kv_heads=2),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_layers=28, num_heads=12, num_kv_heads=2),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                 num_heads=4, num_kv_heads=2),
}
# (substring of device_kind, HBM bytes/s, dense bf16 FLOP/s), first match wins: datasheet values
NOMINAL = (
    ("H100 PCIe", 2.0e12, 756e12),
    ("H100 NVL", 3.9e12, 835e12),
    ("H200 NVL", 4.8e12, 835e12),
    ("H200", 4.8e12, 989e12),
    ("H100", 3.35e12, 989e12),  # SXM ("NVIDIA H100 80GB HBM3")
)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--shape", required=True, choices=sorted(SHAPES))
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES),
                    help="param, compute and KV-cache dtype; also the peak matmul's")
    ap.add_argument("--batch", type=int, nargs="+", default=[64, 128, 256],
                    help="decode rows N (each a multiple of --group)")
    ap.add_argument("--group", type=int, default=8, help="G: rows per prompt (prefilled once)")
    ap.add_argument("--prompt-len", type=int, default=128, help="P, tokens per prompt")
    ap.add_argument("--new-tokens", type=int, default=256,
                    help="T: calls with T and 2T new tokens are timed, the difference is decode")
    ap.add_argument("--skip-decode", action="store_true", help="time the update only")
    ap.add_argument("--temperature", type=float, default=1.0, help="decode sampling (0 = greedy)")
    ap.add_argument("--train-batch", type=int, default=8, help="R, rows of the update (0 = skip)")
    ap.add_argument("--train-group", type=int, default=8, help="G of the update (divides R)")
    ap.add_argument("--train-len", type=int, default=1024, help="tokens per row, prompt included")
    ap.add_argument("--train-prompt-len", type=int, default=128, help="P_t, shared per group")
    ap.add_argument("--remat", action="store_true", help="rematerialize layers in the update")
    ap.add_argument("--logits-chunk", type=int, default=None,
                    help="positions per log-prob chunk in the update (default: the model's)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    ap.add_argument("--inner", type=int, default=10, help="back-to-back calls per bandwidth / "
                    "matmul timing")
    ap.add_argument("--bw-mib", type=int, default=None,
                    help="bandwidth array size (default: 1024 on accelerators, 64 on CPU)")
    ap.add_argument("--peak-n", type=int, default=None,
                    help="side of the peak matmul (default: 8192 on accelerators, 512 on CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the final JSON object here")
    a = ap.parse_args(argv)
    for name in ("group", "prompt_len", "new_tokens", "repeats", "inner", "train_len"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    bad = [n for n in a.batch if n < 1 or n % a.group]
    if bad:
        raise SystemExit(f"--batch {bad}: each must be a positive multiple of --group {a.group}")
    if a.train_batch:
        if a.train_group < 2 or a.train_batch % a.train_group:
            raise SystemExit(f"--train-batch {a.train_batch} must be a multiple of --train-group "
                             f"{a.train_group} (>= 2)")
        if not 1 <= a.train_prompt_len < a.train_len:
            raise SystemExit(f"--train-prompt-len must be in [1, --train-len={a.train_len})")
    return a


def model_config(shape: str, dtype: str, remat: bool = False) -> ModelConfig:
    """Qwen2.5 (tied embeddings, q/k/v biases, rope_theta 1e6) of the named size."""
    return ModelConfig(arch="qwen2", **SHAPES[shape], rope_theta=1e6, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, attention_bias=True, param_dtype=dtype,
                       compute_dtype=dtype, remat=remat)


def nominal(device_kind: str) -> tuple[float | None, float | None]:
    for name, bw, flops in NOMINAL:
        if name.lower() in device_kind.lower():
            return bw, flops
    return None, None


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1%}"


# ----------------------------------------------------------------------------- device peaks


def time_calls(fn, repeats: int, inner: int = 1) -> list[float]:
    """Seconds per call: `repeats` timings, each the mean of `inner` calls back to back."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            r = fn()
        jax.block_until_ready(r)
        out.append((time.perf_counter() - t0) / inner)
    return out


def hbm_bandwidth(mib: int, repeats: int, inner: int) -> dict:
    """Achievable memory bandwidth: a jitted x + 1 reads and writes the whole array once."""
    x = jnp.zeros((mib * 2 ** 20 // 4,), jnp.float32)
    f = jax.jit(lambda x: x + 1)
    jax.block_until_ready(f(x))
    times = time_calls(lambda: f(x), repeats, inner)
    moved = 2.0 * x.nbytes
    return {"bytes_per_s": moved / min(times), "median_bytes_per_s": moved / statistics.median(times),
            "array_mib": mib}


def matmul_peak(n: int, dtype: str, repeats: int, inner: int) -> dict:
    dt = M.DTYPES[dtype]
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dt)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32).astype(dt)
    f = jax.jit(jnp.dot)
    jax.block_until_ready(f(a, b))
    times = time_calls(lambda: f(a, b), repeats, inner)
    return {"flops_per_s": 2.0 * n ** 3 / min(times),
            "median_flops_per_s": 2.0 * n ** 3 / statistics.median(times), "n": n, "dtype": dtype}


# ----------------------------------------------------------------------------- decode


def matmul_weights(cfg: ModelConfig) -> int:
    """N_ne: weights of the layers' matmuls (no embedding, biases or norms)."""
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.hd
    return cfg.num_layers * (d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * f)


def decode_roofline(cfg: ModelConfig, rows: int, p: int, t: int, bandwidth: float,
                    peak: float) -> dict:
    """Per-step bytes, FLOPs and floors of the decode steps T .. 2T-1 (see the docstring)."""
    nbytes = DTYPE_BYTES[cfg.param_dtype]
    untied_embed = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size
    weight_bytes = (cfg.num_params - untied_embed) * nbytes
    ctx = p + 1.5 * t + 0.5  # mean of P + j + 1 over j = T .. 2T-1
    slot_bytes = cfg.num_layers * 2 * rows * cfg.num_kv_heads * cfg.hd * DTYPE_BYTES[cfg.compute_dtype]
    kv_bytes = slot_bytes * ctx
    flops = rows * (2 * matmul_weights(cfg) + 2 * cfg.hidden_size * cfg.vocab_size
                    + 4 * cfg.num_layers * cfg.num_heads * cfg.hd * ctx)
    return {"weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "mean_context": ctx,
            "logits_bytes": rows * cfg.vocab_size * 4, "flops": flops,
            "roofline_s": (weight_bytes + kv_bytes) / bandwidth, "compute_floor_s": flops / peak}


def bench_decode(cfg: ModelConfig, params, a, bandwidth: float, peak: float,
                 nominal_bw: float | None) -> list[dict]:
    t = a.new_tokens
    samplers = {n: Sampler(cfg, SamplerConfig(max_new_tokens=n, temperature=a.temperature,
                                              stop_ids=()), pad_id=0) for n in (t, 2 * t)}
    rng = np.random.default_rng(a.seed)
    key = jax.random.key(a.seed + 1)
    results = []
    for rows in a.batch:
        b = rows // a.group
        tokens = jnp.asarray(rng.integers(4, cfg.vocab_size, (b, a.prompt_len)), jnp.int32)
        mask = jnp.ones(tokens.shape, bool)
        calls = {}
        first = {}
        for n, s in samplers.items():
            def call(i, s=s):
                return jax.block_until_ready(s(params, tokens, mask, jax.random.fold_in(key, i),
                                               group_size=a.group))
            t0 = time.perf_counter()
            out = call(10_000)  # compile + run
            first[n] = time.perf_counter() - t0
            if out.tokens.shape != (rows, n) or not bool((np.asarray(out.lengths) == n).all()):
                raise SystemExit(f"batch {rows}: expected {rows} rows of {n} tokens, got lengths "
                                 f"{np.asarray(out.lengths)}")
            call(10_001)  # warm-up
            calls[n] = call
        times = {n: [] for n in calls}
        for i in range(a.repeats):  # interleaved T, 2T, T, 2T ...
            for n, call in calls.items():
                t0 = time.perf_counter()
                call(i)
                times[n].append(time.perf_counter() - t0)
        med = {n: statistics.median(v) for n, v in times.items()}
        step_s = (med[2 * t] - med[t]) / t
        if step_s <= 0:
            raise SystemExit(f"batch {rows}: the 2T call ({med[2 * t]:.4f}s) was not slower than "
                             f"the T call ({med[t]:.4f}s): raise --new-tokens or --repeats")
        roof = decode_roofline(cfg, rows, a.prompt_len, t, bandwidth, peak)
        frac = roof["roofline_s"] / step_s
        frac_nominal = (None if nominal_bw is None else
                        (roof["weight_bytes"] + roof["kv_bytes"]) / nominal_bw / step_s)
        r = {"rows": rows, "prompts": b, "group": a.group, "prompt_len": a.prompt_len,
             "new_tokens": t, "call_s": {str(n): med[n] for n in med},
             "call_s_all": {str(n): times[n] for n in times},
             "compile_s": {str(n): max(first[n] - med[n], 0.0) for n in first},
             "step_s": step_s, "tokens_per_s": rows / step_s,
             "e2e_tokens_per_s": rows * 2 * t / med[2 * t],
             "prefill_s_est": max(med[t] - t * step_s, 0.0), **roof,
             "roofline_fraction": frac, "roofline_fraction_nominal": frac_nominal,
             "roofline_fraction_with_compute": max(roof["roofline_s"], roof["compute_floor_s"]) / step_s}
        results.append(r)
        print(f"[decode] N={rows:4d} ({b} prompts x G={a.group}), P={a.prompt_len}, T={t}/{2 * t}: "
              f"{step_s * 1e3:.3f} ms/step, {r['tokens_per_s']:,.0f} tokens/s "
              f"(end to end at 2T: {r['e2e_tokens_per_s']:,.0f}); roofline "
              f"{roof['roofline_s'] * 1e3:.3f} ms (weights {roof['weight_bytes'] / 1e6:.1f} MB + "
              f"KV {roof['kv_bytes'] / 1e6:.1f} MB at context {roof['mean_context']:.0f}) -> "
              f"{frac:.1%} of the measured-bandwidth roofline ({_pct(frac_nominal)} of nominal); "
              f"compute floor {roof['compute_floor_s'] * 1e3:.3f} ms; compile "
              f"{r['compile_s'][str(t)]:.1f}s/{r['compile_s'][str(2 * t)]:.1f}s")
    return results


# ----------------------------------------------------------------------------- train


def train_flops(cfg: ModelConfig, *, prompts: int, rows: int, p: int, t: int) -> dict:
    """Model FLOPs of one update (forward + backward) over the group-major batch (docstring)."""
    tokens = prompts * p + rows * t
    pairs = prompts * p * (p + 1) // 2 + rows * (t * p + t * (t + 1) // 2)
    dense = 6 * matmul_weights(cfg) * tokens
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.hd * pairs
    unembed = 6 * cfg.hidden_size * cfg.vocab_size * rows * t
    return {"tokens": tokens, "attention_pairs": pairs, "dense": float(dense),
            "attention": float(attention), "unembed": float(unembed),
            "total": float(dense + attention + unembed)}


def synthetic_batch(cfg: ModelConfig, *, prompts: int, group: int, p: int, t: int, seed: int):
    """A group-major batch as GRPOTrainer.step builds it: every completion token real, in the loss."""
    rng = np.random.default_rng(seed)
    comp = rng.integers(4, cfg.vocab_size, (prompts, group, t)).astype(np.int32)
    ones = np.ones((prompts, group, t), bool)
    logps = -rng.exponential(2.0, (prompts, group, t)).astype(np.float32)
    adv = rng.standard_normal((prompts, group)).astype(np.float32)
    batch = dict(prompt=rng.integers(4, cfg.vocab_size, (prompts, p)).astype(np.int32),
                 prompt_mask=np.ones((prompts, p), bool), comp=comp, gen_mask=ones, loss_mask=ones,
                 adv=adv, sampler_logps=logps, ref_logps=logps + 0.01)
    return jax.device_put(batch)


def bench_train(cfg: ModelConfig, params, a, peak: float, nominal_peak: float | None) -> dict:
    r, g, p = a.train_batch, a.train_group, a.train_prompt_len
    t, b = a.train_len - p, r // g
    if a.logits_chunk is not None:
        cfg = dataclasses.replace(cfg, logits_chunk=a.logits_chunk)
    exp = Experiment(seed=a.seed, steps=a.repeats + 1, prompts_per_step=b,
                     model=ModelSource(init=cfg, remat=a.remat),
                     sampler=SamplerConfig(max_new_tokens=t, stop_ids=(-1,)),
                     grpo=GRPOConfig(group_size=g, mu=1, minibatches=1, kl_coef=0.04),
                     optim=OptimConfig(lr=1e-6, clip_norm=1.0),
                     log=LogConfig(progress=False, tensorboard=False, samples_every=0))
    tok = types.SimpleNamespace(eos_token_id=1, pad_token_id=0)  # the update never decodes
    trainer = GRPOTrainer(exp, cfg, tok, task=None)
    state = trainer.init_state(params)  # `params` is donated from here on
    batch = synthetic_batch(cfg, prompts=b, group=g, p=p, t=t, seed=a.seed + 2)
    key = jax.random.key(a.seed + 3)

    def call(i):
        nonlocal state
        state, metrics = trainer._update(state, batch, jax.random.fold_in(key, i))
        jax.block_until_ready(state)
        return metrics

    t0 = time.perf_counter()
    m = jax.device_get(call(0))  # compile + run
    first = time.perf_counter() - t0
    if not all(np.isfinite(float(v)) for v in m.values()) or float(m["skipped_updates"]) != 0:
        raise SystemExit(f"update: non-finite or skipped: {m}")
    times = []
    for i in range(a.repeats):
        t0 = time.perf_counter()
        call(i + 1)
        times.append(time.perf_counter() - t0)
    if trainer._update._cache_size() != 1:
        raise SystemExit(f"the update recompiled: {trainer._update._cache_size()} variants")
    s = statistics.median(times)
    fl = train_flops(cfg, prompts=b, rows=r, p=p, t=t)
    mfu = fl["total"] / s / peak
    mfu_nominal = None if nominal_peak is None else fl["total"] / s / nominal_peak
    out = {"rows": r, "prompts": b, "group": g, "prompt_len": p, "completion_len": t,
           "train_len": a.train_len, "remat": cfg.remat, "logits_chunk": cfg.logits_chunk,
           "scan_layers": cfg.use_scan, "step_s": s, "step_s_all": times,
           "compile_s": max(first - s, 0.0), "tokens_per_s": fl["tokens"] / s,
           "flops": fl, "achieved_flops_per_s": fl["total"] / s, "mfu": mfu,
           "mfu_nominal": mfu_nominal, "loss": float(m["loss"])}
    print(f"[train]  R={r} rows ({b} prompts x G={g}), P_t={p} + T_t={t}: {s * 1e3:.1f} ms/update, "
          f"{out['tokens_per_s']:,.0f} tokens/s, {fl['total'] / 1e12:.3f} TFLOP (dense "
          f"{fl['dense'] / fl['total']:.0%}, attention {fl['attention'] / fl['total']:.0%}, unembed "
          f"{fl['unembed'] / fl['total']:.0%}) -> {fl['total'] / s / 1e12:.2f} TFLOP/s = MFU "
          f"{mfu:.1%} of the measured peak ({_pct(mfu_nominal)} of nominal); compile "
          f"{out['compile_s']:.1f}s")
    return out


# ----------------------------------------------------------------------------- main


def main(argv=None) -> dict:
    a = parse_args(argv)
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", str(dev))
    accel = jax.default_backend() != "cpu"
    bw_mib = a.bw_mib or (1024 if accel else 64)
    peak_n = a.peak_n or (8192 if accel else 512)
    nom_bw, nom_flops = nominal(kind)
    cfg = model_config(a.shape, a.dtype, a.remat)
    print(f"[bench]  {a.shape}: {cfg.num_params:,} params ({matmul_weights(cfg):,} in layer "
          f"matmuls), {a.dtype}; jax {jax.__version__} on {jax.default_backend()} ({kind}), "
          f"{jax.device_count()} device(s)")

    bw = hbm_bandwidth(bw_mib, a.repeats, a.inner)
    mm = matmul_peak(peak_n, a.dtype, a.repeats, a.inner)
    print(f"[peak]   memory bandwidth {bw['bytes_per_s'] / 1e12:.3f} TB/s (x + 1 over {bw_mib} MiB, "
          f"best of {a.repeats}; nominal {'n/a' if nom_bw is None else f'{nom_bw / 1e12:.2f} TB/s'})")
    print(f"[peak]   {a.dtype} matmul {peak_n}^3 {mm['flops_per_s'] / 1e12:.2f} TFLOP/s (best of "
          f"{a.repeats}; nominal {'n/a' if nom_flops is None else f'{nom_flops / 1e12:.0f} TFLOP/s'})")

    params = M.init_params(cfg, jax.random.key(a.seed))
    decode = ([] if a.skip_decode else
              bench_decode(cfg, params, a, bw["bytes_per_s"], mm["flops_per_s"], nom_bw))
    train = (bench_train(cfg, params, a, mm["flops_per_s"], nom_flops) if a.train_batch else None)
    del params  # donated to the update's state

    memory = None
    try:
        stats = dev.memory_stats() or {}
        memory = {k: stats[k] for k in ("peak_bytes_in_use", "bytes_limit") if k in stats}
    except Exception:  # not every backend reports memory
        pass
    result = {
        "bench": "bench_gpu", "shape": a.shape, "dtype": a.dtype, "params": cfg.num_params,
        "matmul_weights": matmul_weights(cfg), "backend": jax.default_backend(),
        "device_kind": kind, "device_count": jax.device_count(), "jax": jax.__version__,
        "hbm_bandwidth": bw["bytes_per_s"], "hbm_bandwidth_median": bw["median_bytes_per_s"],
        "bw_array_mib": bw_mib, "matmul_peak": mm["flops_per_s"],
        "matmul_peak_median": mm["median_flops_per_s"], "peak_n": peak_n,
        "nominal_bandwidth": nom_bw, "nominal_peak": nom_flops,
        "bandwidth_of_nominal": None if nom_bw is None else bw["bytes_per_s"] / nom_bw,
        "peak_of_nominal": None if nom_flops is None else mm["flops_per_s"] / nom_flops,
        "decode": decode, "train": train,
        "targets": {"decode_roofline_fraction_min": 0.60, "decode_min_batch": 64, "train_mfu_min": 0.35,
                    "decode_met": all(d["roofline_fraction"] >= 0.60 for d in decode if d["rows"] >= 64)
                    if any(d["rows"] >= 64 for d in decode) else None,
                    "train_met": None if train is None else train["mfu"] >= 0.35},
        "memory": memory, "args": vars(a), "total_s": time.perf_counter() - t_start,
        "python": platform.python_version(), "load_avg_1m": os.getloadavg()[0],
    }
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
