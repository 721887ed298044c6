"""Throughput of the jitted KV-cache sampler, against the matmul peak of the same process and,
optionally, against `transformers` `generate` on the same weights.

    python scripts/make_tiny_model.py --out /tmp/bench_tiny
    python scripts/bench_sampler.py --model-dir /tmp/bench_tiny --prompts 8 --group 8 \
        --prompt-len 16 --new-tokens 32 --compare-hf

Every prompt has exactly --prompt-len random tokens (ids 4 .. vocab-1, seeded, no padding) and
there are no stop ids, so each of the N = prompts * group rows generates exactly --new-tokens
tokens. One call is compiled and run (its time minus the steady-state time is `compile_s`) and
one more warms up; with --compare-hf the same directory is also loaded by
`transformers.AutoModelForCausalLM` (float32, eval, inference mode) and `generate` warmed up
twice with the same sampling settings. Then --repeats rounds are timed, each round running one
sampler call (its own key via `jax.random.fold_in`, `jax.block_until_ready`), one `generate`
call and --peak-repeats float32 [n, n] matmuls, interleaved so that a load change on a shared
machine hits every measurement alike, each preceded by --settle seconds (at least one call) of
untimed calls of the same kind (torch's OpenMP workers spin after a call and slow the next JAX
work down for 20-50 ms); medians are reported. Each framework uses the threads it
uses by default. The load average and the cores each framework kept busy (process CPU time /
wall time) are printed, to show when another job was competing.

`model_flops_per_call` counts the work a sampler needs, not what an implementation executes:
2 * (matmul weights) per token for the B prompts' P tokens (each prompt prefilled once) and the
N rows' T - 1 decode forwards (the T-th sampled token needs no forward pass), 4 * ctx * H * Hd
per token per layer for attention over its causal context only (ctx = position + 1), and
2 * D * V of unembedding for each position whose logits are sampled from (B prefill positions,
N * (T - 1) decode positions). `executed_flops_per_call` is what our sampler actually computes
(the same forwards, but every query attends over all P prompt slots and, in the decode, over
all slots of its cache window: `SamplerConfig.cache_windows`), for diagnosis. The last line printed is one JSON object with all numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

if __name__ == "__main__":  # the allocator setting of `grpo-jax` (hostmem.py; may restart)
    from grpo_jax import hostmem

    MALLOC = hostmem.configure()
else:
    MALLOC = "unchanged (imported)"

import jax  # noqa: E402
import jax.numpy as jnp
import numpy as np

from grpo_jax import hf_io, sharding
from grpo_jax.config import ModelConfig, SamplerConfig
from grpo_jax.sampler import Sampler, cache_windows

if __name__ == "__main__" and hostmem.trim_after_compiles():
    MALLOC += ", trim after compiles"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model-dir", required=True, help="a Hugging Face model directory")
    ap.add_argument("--prompts", type=int, default=8, help="B, distinct prompts")
    ap.add_argument("--group", type=int, default=8, help="G, completions per prompt")
    ap.add_argument("--prompt-len", type=int, default=16, help="P, tokens per prompt (exact)")
    ap.add_argument("--new-tokens", type=int, default=32, help="T, generated tokens per row")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    ap.add_argument("--top-k", type=int, default=0, help="0 = off")
    ap.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    ap.add_argument("--repeats", type=int, default=5,
                    help="timing rounds: one timed call of each framework per round (median)")
    ap.add_argument("--cache-windows", type=int, default=SamplerConfig.cache_windows,
                    help="SamplerConfig.cache_windows (1 = attend over all T slots at every step)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--settle", type=float, default=0.1,
                    help="seconds of untimed calls (at least one) before the timed ones of each "
                         "framework in every round")
    ap.add_argument("--param-dtype", default=None,
                    help="cast our weights on load (float32, bfloat16); unset: the checkpoint's")
    ap.add_argument("--peak-n", type=int, default=1024, help="side of the float32 matmul for the peak")
    ap.add_argument("--peak-repeats", type=int, default=3, help="peak matmuls per timing round")
    ap.add_argument("--cpu-devices", type=int, default=0,
                    help="XLA CPU devices to decode over, one program each (0 = one per core, as "
                         "`grpo-jax run` does; 1 = one device); ignored on GPU / TPU")
    ap.add_argument("--compare-hf", action="store_true",
                    help="also time transformers generate (torch, float32, CPU)")
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    dev = jax.devices()[0]
    try:
        import jaxlib

        jaxlib_version = jaxlib.__version__
    except Exception:
        jaxlib_version = None
    return {"backend": jax.default_backend(), "device": str(dev),
            "device_kind": getattr(dev, "device_kind", None), "device_count": jax.device_count(),
            "jax": jax.__version__, "jaxlib": jaxlib_version,
            "cpus_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(), "cpu_model": _cpu_model(), "python": platform.python_version(),
            "malloc": MALLOC, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}


def setup_peak(n: int):
    """A jitted float32 [n, n] @ [n, n], warmed up; returns call(i) (its FLOPs are 2 n^3)."""
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    for _ in range(2):
        jax.block_until_ready(f(a, b))
    return lambda i: jax.block_until_ready(f(a, b))


def timed_rounds(calls: dict, per_round: dict, rounds: int, settle_s: float) -> dict:
    """Time the calls interleaved, round after round (A B C A B C ...), so that a load change on a
    shared machine hits all of them alike. After each switch to another framework, untimed calls
    run first for at least `settle_s` seconds (and at least one call): the first JAX work after a
    torch call runs ~2x slower for some 20-50 ms (torch's OpenMP workers still spin), and a
    sleep instead makes the next call of either framework slow. Returns {name: (wall, cpu)}."""
    out = {name: ([], []) for name in calls}
    for i in range(rounds):
        for name, fn in calls.items():
            t_end, j = time.perf_counter() + settle_s, 0
            while j == 0 or time.perf_counter() < t_end:
                fn(i * 1000 + 500 + j)
                j += 1
            for j in range(per_round.get(name, 1)):
                w0, c0 = time.perf_counter(), time.process_time()
                fn(i * 1000 + j)
                out[name][0].append(time.perf_counter() - w0)
                out[name][1].append(time.process_time() - c0)
    return out


# ----------------------------------------------------------------------------- flops


def _matmul_weights_per_token(cfg: ModelConfig) -> int:
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.hd
    per_layer = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * f
    return cfg.num_layers * per_layer  # unembedding counted separately


def flops_per_call(cfg: ModelConfig, b: int, g: int, p: int, t: int,
                   windows: tuple[int, ...] = ()) -> dict:
    n = b * g
    w = _matmul_weights_per_token(cfg)
    attn_unit = 4 * cfg.num_layers * cfg.num_heads * cfg.hd  # per token per context slot
    unembed = 2 * cfg.hidden_size * cfg.vocab_size
    # needed work: prefill B*P tokens (causal ctx 1..P), decode N*(T-1) tokens at positions
    # P..P+T-2 (ctx P+1..P+T-1), logits at B + N*(T-1) positions
    prefill_ctx = p * (p + 1) // 2
    decode_ctx = sum(p + 1 + j for j in range(t - 1))
    model = (2 * w * (b * p + n * (t - 1)) + attn_unit * (b * prefill_ctx + n * decode_ctx)
             + unembed * (b + n * (t - 1)))
    # what our sampler executes: the same forwards, but a prompt token attends over all P
    # prompt slots, and decode step j over P + the slots of its cache window (`cache_windows`:
    # the first window w with j < w), masked ones included
    windows = windows or (t,)
    decode_slots = sum(p + next(x for x in windows if j < x) for j in range(t - 1))
    executed = (2 * w * (b * p + n * (t - 1)) + attn_unit * (b * p * p + n * decode_slots)
                + unembed * (b + n * (t - 1)))
    return {"model": float(model), "executed": float(executed)}


# ----------------------------------------------------------------------------- benchmarks


def setup_jax(cfg, params, prompts: np.ndarray, a):
    """Compile and warm up the sampler; returns (call(i), info)."""
    scfg = SamplerConfig(max_new_tokens=a.new_tokens, temperature=a.temperature, top_k=a.top_k,
                         top_p=a.top_p, stop_ids=(), cache_windows=a.cache_windows)
    mesh = sharding.cpu_rollout_mesh()
    sampler = Sampler(cfg, scfg, pad_id=0, mesh=mesh)
    tokens = jnp.asarray(prompts, jnp.int32)
    mask = jnp.ones(prompts.shape, bool)
    key = jax.random.key(a.seed + 1)

    def call(i):
        return jax.block_until_ready(sampler(params, tokens, mask, jax.random.fold_in(key, i),
                                             group_size=a.group))

    t0 = time.perf_counter()
    out = call(10_000)  # compile + run
    first = time.perf_counter() - t0
    call(10_001)  # one more warm-up call
    lengths = np.asarray(out.lengths)
    n = a.prompts * a.group
    if not (lengths == a.new_tokens).all() or out.tokens.shape != (n, a.new_tokens):
        raise SystemExit(f"expected {n} rows of {a.new_tokens} tokens, got lengths {lengths}")
    if sampler.cache_size() != 1:
        raise SystemExit(f"the sampler recompiled: {sampler.cache_size()} compiled variants")
    return call, {"first_call_s": first, "tokens_per_call": n * a.new_tokens,
                  "decode_devices": 1 if mesh is None else mesh.size}


def _hf_processors(model, gen_kwargs) -> list[str]:
    """Names of the logits processors `generate` really builds (wraps its private builder)."""
    orig = getattr(model, "_get_logits_processor", None)
    if orig is None:
        return ["<unknown: no _get_logits_processor>"]
    seen: list[str] = []

    def spy(*args, **kw):
        procs = orig(*args, **kw)
        seen[:] = [type(p).__name__ for p in procs]
        return procs

    model._get_logits_processor = spy
    try:
        import torch

        with torch.inference_mode():
            model.generate(**gen_kwargs)
    finally:
        del model._get_logits_processor
    return seen


def setup_hf(model_dir: str, prompts: np.ndarray, a):
    """Load the model with transformers and warm `generate` up; returns (call(i), info)."""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    input_ids = torch.as_tensor(prompts, dtype=torch.long)
    sample = a.temperature > 0
    group = a.group
    if not sample:
        # greedy generate refuses num_return_sequences > 1: repeat the prompts instead (what
        # generate does internally when sampling: rows b*G .. b*G+G-1 belong to prompt b)
        input_ids, group = input_ids.repeat_interleave(a.group, dim=0), 1
    gen = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
               do_sample=sample, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
               num_return_sequences=group, use_cache=True, pad_token_id=0, eos_token_id=None)
    if sample:
        # explicit values: an unset top_k would let generation_config's default (50) apply
        gen |= dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p)
    processors = _hf_processors(model, gen)  # also the first warm-up call
    expected = set()
    if sample and a.temperature != 1.0:
        expected.add("TemperatureLogitsWarper")
    if sample and a.top_k > 0:
        expected.add("TopKLogitsWarper")
    if sample and a.top_p < 1.0:
        expected.add("TopPLogitsWarper")
    if set(processors) != expected:
        print(f"[warn] transformers built logits processors {processors}, expected "
              f"{sorted(expected)}: the comparison is not like for like", file=sys.stderr)

    def call(i):
        torch.manual_seed(a.seed + i)
        with torch.inference_mode():
            return model.generate(**gen)

    out = call(10_000)  # second warm-up
    n = a.prompts * a.group
    if tuple(out.shape) != (n, a.prompt_len + a.new_tokens):
        raise SystemExit(f"transformers returned shape {tuple(out.shape)}, expected "
                         f"{(n, a.prompt_len + a.new_tokens)}")
    return call, {"processors": processors, "torch": torch.__version__,
                  "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
                  "attn_implementation": getattr(model.config, "_attn_implementation", None)}


def main(argv=None) -> None:
    a = parse_args(argv)
    sharding.use_cpu_devices(a.cpu_devices)  # before JAX starts its backends
    info = machine_info()
    cfg, params = hf_io.load(a.model_dir, param_dtype=a.param_dtype)
    params = jax.device_put(params)
    print(f"[bench] {a.model_dir}: {cfg.arch}, {cfg.num_params:,} params, {cfg.param_dtype} "
          f"weights / {cfg.compute_dtype} matmuls; jax {info['jax']} on {info['backend']} "
          f"({info['device_kind']}), {info['cpus_available']} CPUs ({info['cpu_model']})")
    if a.prompt_len < 1 or a.new_tokens < 1 or a.prompts < 1 or a.group < 1 or a.repeats < 1:
        raise SystemExit("--prompts, --group, --prompt-len, --new-tokens, --repeats must be >= 1")
    rng = np.random.default_rng(a.seed)
    prompts = rng.integers(4, cfg.vocab_size, size=(a.prompts, a.prompt_len), dtype=np.int64)
    b, g, p, t = a.prompts, a.group, a.prompt_len, a.new_tokens
    print(f"[bench] B={b} prompts x G={g} = N={b * g} rows, P={p} prompt tokens, T={t} new "
          f"tokens, temperature={a.temperature} top_k={a.top_k} top_p={a.top_p}, "
          f"median of {a.repeats}")

    calls = {"peak": setup_peak(a.peak_n)}
    jax_call, r = setup_jax(cfg, params, prompts, a)
    calls["jax"] = jax_call
    if a.compare_hf:
        calls["hf"], h = setup_hf(a.model_dir, prompts, a)
    load_before = os.getloadavg()[0]
    times = timed_rounds(calls, {"peak": a.peak_repeats}, a.repeats, a.settle)
    load_after = os.getloadavg()[0]
    med = {k: statistics.median(w) for k, (w, _) in times.items()}
    for k, (w, _) in times.items():
        if max(w) > 1.5 * min(w):
            print(f"[warn] {k}: timed calls range from {min(w) * 1e3:.1f} to {max(w) * 1e3:.1f} ms; "
                  "another job is probably competing for the CPUs (torch suffers most)",
                  file=sys.stderr)
    util = {k: sum(c) / sum(w) for k, (w, c) in times.items()}

    peak = 2.0 * a.peak_n ** 3 / med["peak"]
    print(f"[bench] float32 matmul {a.peak_n}x{a.peak_n}: {peak / 1e9:.1f} GFLOP/s "
          f"(median of {len(times['peak'][0])})")
    windows = cache_windows(t, a.cache_windows)
    fl = flops_per_call(cfg, b, g, p, t, windows)
    s_call = med["jax"]
    tps = r["tokens_per_call"] / s_call
    achieved = fl["model"] / s_call
    compile_s = max(r["first_call_s"] - s_call, 0.0)
    print(f"[jax]   first call {r['first_call_s']:.2f}s (compile ~{compile_s:.2f}s); "
          f"{s_call * 1e3:.1f} ms/call = {tps:,.0f} generated tokens/s; "
          f"{s_call / t * 1e3:.2f} ms per decode step (all rows); "
          f"process CPU use {util['jax']:.2f} cores")
    print(f"[jax]   model FLOPs/call {fl['model'] / 1e9:.3f} G (executed {fl['executed'] / 1e9:.3f} G) "
          f"-> {achieved / 1e9:.2f} GFLOP/s = {achieved / peak:.1%} of the matmul peak")

    result = {
        "bench": "sampler", "model_dir": str(a.model_dir), "arch": cfg.arch,
        "params": cfg.num_params, "param_dtype": cfg.param_dtype, "compute_dtype": cfg.compute_dtype,
        "prompts": b, "group": g, "rows": b * g, "prompt_len": p, "new_tokens": t,
        "temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p, "repeats": a.repeats,
        "cache_windows": list(windows),
        "tokens_per_call": r["tokens_per_call"], "tokens_per_s": tps, "s_per_call": s_call,
        "s_per_call_all": times["jax"][0], "first_call_s": r["first_call_s"], "compile_s": compile_s,
        "model_flops_per_call": fl["model"], "executed_flops_per_call": fl["executed"],
        "achieved_flops": achieved, "matmul_peak_flops": peak, "matmul_peak_n": a.peak_n,
        "ratio_of_peak": achieved / peak, "jax_cpu_cores_used": util["jax"],
        "decode_devices": r["decode_devices"],
        "loadavg_1m_before": load_before, "loadavg_1m_after": load_after, **info,
    }
    if a.compare_hf:
        hf_s = med["hf"]
        hf_tps = r["tokens_per_call"] / hf_s
        print(f"[hf]    transformers {h['transformers']} / torch {h['torch']} "
              f"({h['torch_threads']} threads, attn {h['attn_implementation']}), logits processors "
              f"{h['processors']}: {hf_s * 1e3:.1f} ms/call = {hf_tps:,.0f} generated tokens/s; "
              f"process CPU use {util['hf']:.2f} cores")
        print(f"[bench] speedup vs transformers: {tps / hf_tps:.2f}x")
        result |= {"hf_tokens_per_s": hf_tps, "hf_s_per_call": hf_s,
                   "hf_s_per_call_all": times["hf"][0], "speedup_vs_hf": tps / hf_tps,
                   "hf_ratio_of_peak": fl["model"] / hf_s / peak,
                   "hf_cpu_cores_used": util["hf"],
                   "hf_logits_processors": h["processors"], "torch": h["torch"],
                   "transformers": h["transformers"], "torch_threads": h["torch_threads"],
                   "hf_attn_implementation": h["attn_implementation"]}
    print(f"[bench] 1-minute load average {load_before:.2f} before, {load_after:.2f} after "
          f"({info['cpus_available']} CPUs); above ~{info['cpus_available'] + 0.5:.1f} another job "
          "was competing")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
