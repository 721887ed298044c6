"""Time of one GRPO step (rollout, rewards, reference scoring, update) of our `GRPOTrainer` on a
Hugging Face model directory, against the matmul peak of the same process.

    python scripts/make_tiny_model.py --out /tmp/bench_tiny
    python scripts/bench_grpo.py --model-dir /tmp/bench_tiny --steps 10
    python scripts/bench_trl_grpo.py --model-dir /tmp/bench_tiny --steps 10   # the same with TRL

The workload (shared with scripts/bench_trl_grpo.py, which imports it from here):
  - B = --prompts arithmetic prompts per step, each exactly --prompt-len tokens with the model's
    tokenizer, in the style "Compute 37+158. " (the operand digit counts are drawn until the
    prompt has exactly P tokens; with the character tokenizer of make_tiny_model.py, P = 16
    gives e.g. "Compute 37+158. "), so no prompt is padded. Step s uses the prompts of
    `BenchArithTask.train(B, seed=s)` in both scripts.
  - G = --group completions per prompt, at most T = --new-tokens new tokens, temperature 1, no
    top-k / top-p. `--stop eos` (default): a completion ends at the tokenizer's EOS, as both
    trainers do by default (ours falls back to the tokenizer EOS; TRL always stops at it).
    `--stop none`: every completion is exactly T tokens (ours: a stop id that never occurs; TRL:
    `min_new_tokens = T`, which masks EOS out of the sampling distribution).
  - rewards: `accuracy` (weight 1.0) + `format` (weight 0.3) of grpo_jax.rewards, on decoded text
    (host time, counted); GRPO advantages (group mean / std); beta = --beta with the k3 estimator;
    mu = 1 (one update per rollout, old log-probs = the current ones); eps = 0.2; loss
    aggregation: mean over each sequence's tokens, then over sequences (TRL loss_type "grpo").
  - AdamW (b1 0.9, b2 0.999, eps 1e-8, weight decay 0) at the constant --lr, global-norm
    clipping at 1.0; float32 weights and matmuls; no rematerialization of the layers.

Timing: 2 (--warmup) steps compile and warm up, then --steps steps are timed, each from the call
to `GRPOTrainer.step` to `jax.block_until_ready` of the new state and `jax.device_get` of its
metrics (our runner fetches metrics one step late; here nothing overlaps across steps). The
median is `s_per_step`; `tokens_per_s` = mean completion tokens per step / s_per_step;
`peak_rss_mib` = ru_maxrss of this process, read after the timed steps and before the matmul
peak is measured.

FLOPs (`model_flops_per_step`, see `model_flops`) count the work a GRPO step needs, at the padded
completion length T (both trainers compute every padded position): the rollout (each prompt
prefilled once, N * (T - 1) decode forwards, logits only where a token is sampled), the
reference forward over the N prompt + completion rows (logits only at the T completion
positions) and the policy forward + backward (3x that forward). A matmul weight costs 2 FLOPs
per token, causal attention 4 * Hd FLOPs per head per (query, key) pair, the unembedding
2 * D * V per position with logits. `achieved_flops` = that / s_per_step, beside the FLOP/s of a
jitted float32 [n, n] @ [n, n] (`--peak-n`) in this process. The last line printed is one JSON
object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import statistics
import sys
import time

# Only light imports at module level: bench_trl_grpo.py imports this module for the workload
# and must not load jax (it would count in TRL's peak memory).
from grpo_jax.config import SamplerConfig
from grpo_jax.rewards import get_reward
from grpo_jax.tasks import TASKS, Example, register_task, stable_id

TASK_NAME = "bench_arith"
REWARD_WEIGHTS: tuple[tuple[str, float], ...] = (("accuracy", 1.0), ("format", 0.3))
EPS_CLIP = 0.2


def add_workload_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model-dir", required=True, help="a Hugging Face model directory")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation)")
    ap.add_argument("--prompts", type=int, default=8, help="B, prompts per step")
    ap.add_argument("--group", type=int, default=8, help="G, completions per prompt")
    ap.add_argument("--prompt-len", type=int, default=16, help="P, tokens per prompt (exact)")
    ap.add_argument("--new-tokens", type=int, default=32, help="T, max new tokens per completion")
    ap.add_argument("--lr", type=float, default=1e-6, help="constant AdamW learning rate")
    ap.add_argument("--beta", type=float, default=0.04, help="KL coefficient (k3 estimator)")
    ap.add_argument("--stop", choices=("eos", "none"), default="eos",
                    help="eos: completions end at the tokenizer's EOS; none: always T tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-n", type=int, default=1024, help="side of the float32 matmul for the peak")
    ap.add_argument("--peak-repeats", type=int, default=7)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_workload_args(ap)
    ap.add_argument("--cache-windows", type=int, default=SamplerConfig.cache_windows,
                    help="SamplerConfig.cache_windows of the rollout (1 = all T slots every step)")
    ap.add_argument("--micro-batches", type=int, default=1,
                    help="gradient accumulation inside the one update of all B x G completions "
                         "(the same gradient; smaller temporaries)")
    ap.add_argument("--cpu-devices", type=int, default=0,
                    help="XLA CPU devices the rollouts decode over, one program each, training on "
                         "one (0 = one per core, as `grpo-jax run` does; 1 = one device)")
    ap.add_argument("--threads", type=int, default=0, choices=(0, 1),
                    help="XLA CPU threads: 0 = XLA's default (all cores); 1 adds to XLA_FLAGS "
                         "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1 "
                         "(to limit both benchmarks to k cores, run them under taskset)")
    a = ap.parse_args(argv)
    check_args(a)
    return a


def check_args(a: argparse.Namespace) -> None:
    for name in ("steps", "prompts", "prompt_len", "new_tokens"):
        if getattr(a, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if a.group < 2:
        raise SystemExit("--group must be >= 2 (a group needs a baseline)")
    if a.warmup < 0:
        raise SystemExit("--warmup must be >= 0")


# ----------------------------------------------------------------------------- workload


class BenchArithTask:
    """"Compute a+b. " prompts of exactly `prompt_len` tokens under `tokenizer`: the digit counts
    of a and b are drawn (1 to 18 digits each) until the tokenized prompt has that length.

    Drawing takes ~600 tokenizer calls a step (~20 ms); `main` draws every step's prompts before
    the timed steps (the TRL benchmark builds its dataset from the same draws before timing
    too), and `train` returns them from that cache."""

    name = TASK_NAME

    def __init__(self, tokenizer=None, prompt_len: int = 16, max_digits: int = 18):
        if tokenizer is None:
            raise ValueError(f"task {TASK_NAME!r} needs the model's tokenizer (tokenizer=...)")
        self.tok, self.prompt_len, self.max_digits = tokenizer, prompt_len, max_digits
        self._drawn: dict[tuple[int, int], list[Example]] = {}

    def n_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def _draw(self, rng: random.Random) -> Example:
        for _ in range(20_000):
            da, db = rng.randint(1, self.max_digits), rng.randint(1, self.max_digits)
            a = rng.randint(0 if da == 1 else 10 ** (da - 1), 10 ** da - 1)
            b = rng.randint(0 if db == 1 else 10 ** (db - 1), 10 ** db - 1)
            q = f"Compute {a}+{b}. "
            if self.n_tokens(q) == self.prompt_len:
                return {"id": stable_id(TASK_NAME, q), "question": q, "answer": str(a + b)}
        raise SystemExit(f"could not make a 'Compute a+b. ' prompt of exactly {self.prompt_len} "
                         f"tokens with this tokenizer (operands of 1 to {self.max_digits} digits)")

    def train(self, n: int, seed: int) -> list[Example]:
        if (n, seed) not in self._drawn:
            rng = random.Random(f"{TASK_NAME}:train:{seed}")
            self._drawn[n, seed] = [self._draw(rng) for _ in range(n)]
        return [dict(ex) for ex in self._drawn[n, seed]]

    def eval(self, n: int) -> list[Example]:
        return self.train(n, seed=-1)


if TASK_NAME not in TASKS:  # also importable as a module next to running as a script
    register_task(TASK_NAME)(BenchArithTask)


def step_seed(seed: int, step: int) -> int:
    """The `seed` GRPOTrainer.step passes to task.train for `step` (trainer.py)."""
    return seed * 1_000_003 + step


def workload_examples(tok, a: argparse.Namespace, step: int) -> list[Example]:
    """The B examples of `step`, exactly as our trainer draws them."""
    task = BenchArithTask(tokenizer=tok, prompt_len=a.prompt_len)
    return task.train(a.prompts, seed=step_seed(a.seed, step))


def reward_fns() -> list[tuple[str, float, object]]:
    return [(name, w, get_reward(name)) for name, w in REWARD_WEIGHTS]


# ----------------------------------------------------------------------------- flops


def model_flops(*, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                head_dim: int, vocab: int, b: int, g: int, p: int, t: int, beta: float) -> dict:
    """FLOPs one GRPO step needs (see the module docstring), by phase."""
    n, s = b * g, p + t
    w = layers * (hidden * head_dim * (2 * heads + 2 * kv_heads) + 3 * hidden * intermediate)
    attn = 4 * layers * heads * head_dim  # per (query, key) pair
    unembed = 2 * hidden * vocab
    # rollout: B prompts prefilled once (causal), N rows decode T - 1 tokens at positions
    # P .. P+T-2 (the T-th sampled token needs no forward); logits at B + N (T - 1) positions
    decode_ctx = sum(p + 1 + j for j in range(t - 1))
    rollout = (2 * w * (b * p + n * (t - 1)) + attn * (b * p * (p + 1) // 2 + n * decode_ctx)
               + unembed * (b + n * (t - 1)))
    # one forward over N rows of S tokens: positions 0 .. S-2 (the last token predicts nothing),
    # causal attention, logits at the T positions that predict completion tokens
    fwd = 2 * w * n * (s - 1) + attn * n * (s - 1) * s // 2 + unembed * n * t
    ref = fwd if beta > 0 else 0
    update = 3 * fwd  # forward + backward (2x forward)
    return {"rollout": float(rollout), "ref_forward": float(ref), "update": float(update),
            "total": float(rollout + ref + update)}


def hf_config_dims(model_dir: str) -> dict:
    """The shape numbers of model_flops from a config.json (no jax, no torch)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        c = json.load(f)
    c = c.get("text_config", c)
    heads = c["num_attention_heads"]
    return {"hidden": c["hidden_size"], "intermediate": c["intermediate_size"],
            "layers": c["num_hidden_layers"], "heads": heads,
            "kv_heads": c.get("num_key_value_heads") or heads,
            "head_dim": c.get("head_dim") or c["hidden_size"] // heads, "vocab": c["vocab_size"]}


# ----------------------------------------------------------------------------- machine


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def cpu_info() -> dict:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpus_available": cpus, "cpu_model": model, "python": platform.python_version()}


def median_time(fn, repeats: int) -> float:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def jax_matmul_peak(n: int, repeats: int) -> float:
    """FLOP/s of a jitted float32 [n, n] @ [n, n] in this process (median of `repeats`)."""
    import jax
    import jax.numpy as jnp

    x = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    y = jax.random.normal(jax.random.key(2), (n, n), jnp.float32)
    f = jax.jit(jnp.dot)
    for _ in range(2):
        jax.block_until_ready(f(x, y))
    return 2.0 * n ** 3 / median_time(lambda i: jax.block_until_ready(f(x, y)), repeats)


# ----------------------------------------------------------------------------- ours


def build(a: argparse.Namespace):
    """(trainer, state, ref_params, cfg, tok, exp) for the workload, as grpo_jax.runner builds them."""
    import jax

    from grpo_jax.config import (DataConfig, Experiment, GRPOConfig, LogConfig, ModelSource,
                                 OptimConfig, RewardConfig, SamplerConfig)
    from grpo_jax.runner import build_policy
    from grpo_jax.sharding import cpu_rollout_mesh
    from grpo_jax.trainer import GRPOTrainer

    exp = Experiment(
        seed=a.seed, steps=a.warmup + a.steps, prompts_per_step=a.prompts,
        model=ModelSource(path=a.model_dir, param_dtype="float32", compute_dtype="float32",
                          remat=False),
        # stop id -1 never occurs: no stop, every row generates T tokens. () = the tokenizer's EOS.
        sampler=SamplerConfig(max_new_tokens=a.new_tokens, temperature=1.0, top_k=0, top_p=1.0,
                              stop_ids=(-1,) if a.stop == "none" else (), prompt_bucket=a.prompt_len,
                              cache_windows=a.cache_windows),
        grpo=GRPOConfig(group_size=a.group, mu=1, minibatches=1, eps_low=EPS_CLIP, eps_high=EPS_CLIP,
                        kl_coef=a.beta, kl_estimator="k3", adv_norm="group_std",
                        aggregation="seq_mean_token_mean", zero_std="keep"),
        optim=OptimConfig(lr=a.lr, warmup_steps=0, schedule="constant", weight_decay=0.0,
                          clip_norm=1.0, micro_batches=a.micro_batches),
        data=DataConfig(task=TASK_NAME, task_args=json.dumps({"prompt_len": a.prompt_len}),
                        template="plain", max_prompt_tokens=a.prompt_len),
        rewards=RewardConfig(weights=REWARD_WEIGHTS, on_error="raise"),
        log=LogConfig(progress=False, tensorboard=False, samples_every=0),
    )
    cfg, params, tok = build_policy(exp, lambda msg: print(f"[bench] {msg}", file=sys.stderr))
    if cfg.remat or cfg.param_dtype != "float32" or cfg.compute_dtype != "float32":
        raise SystemExit(f"expected float32 without remat, got {cfg.param_dtype}/{cfg.compute_dtype} "
                         f"remat={cfg.remat}")
    task = BenchArithTask(tokenizer=tok, prompt_len=a.prompt_len)
    trainer = GRPOTrainer(exp, cfg, tok, task, sample_mesh=cpu_rollout_mesh())
    state = trainer.init_state(params)
    ref_params = jax.tree.map(jax.numpy.copy, params) if exp.grpo.uses_reference else None
    return trainer, state, ref_params, cfg, tok, exp


def compiled_variants(trainer) -> dict:
    return {"sampler": trainer.sampler.cache_size(), "score": trainer._score._cache_size(),
            "update": trainer._update._cache_size()}


def main(argv=None) -> None:
    a = parse_args(argv)
    if argv is None:  # the allocator setting `grpo-jax` uses (grpo_jax/hostmem.py)
        from grpo_jax import hostmem

        malloc = hostmem.configure()  # may restart this script once, before jax is imported
    else:
        malloc = "unchanged (called from Python)"
    t_start = time.perf_counter()
    if a.threads:
        if "jax" in sys.modules:
            raise SystemExit("--threads must be set before jax is imported")
        flags = ["--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1"]
        os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", "")] + flags).strip()
    import jax

    from grpo_jax.sharding import use_cpu_devices

    use_cpu_devices(a.cpu_devices)  # before JAX starts its backends
    if argv is None:
        malloc += ", trim after compiles" if hostmem.trim_after_compiles() else ""
    rss_stages = {"after_import": peak_rss_mib()}
    trainer, state, ref_params, cfg, tok, exp = build(a)
    rss_stages["after_build"] = peak_rss_mib()
    b, g, p, t = a.prompts, a.group, a.prompt_len, a.new_tokens
    n = b * g
    print(f"[bench] jax {jax.__version__} on {jax.default_backend()} "
          f"({jax.devices()[0].device_kind}); {cfg.arch}, {cfg.num_params:,} params, float32; "
          f"B={b} x G={g} = {n} completions, P={p}, T={t}, stop={a.stop} "
          f"(ids {trainer.stop_ids}), beta={a.beta} k3, mu=1, lr={a.lr}", file=sys.stderr)
    example = workload_examples(tok, a, 0)[0]["question"]
    print(f"[bench] prompt example {example!r} "
          f"({len(tok(example, add_special_tokens=False)['input_ids'])} tokens)", file=sys.stderr)

    for i in range(a.warmup + a.steps):  # every step's prompts, drawn before the timing
        trainer.task.train(b, step_seed(exp.seed, i))
    times, cpu, lengths, truncated, tokens, rewards, variants = [], [], [], [], [], [], None
    same_prompts = True
    for i in range(a.warmup + a.steps):
        c0, t0 = time.process_time(), time.perf_counter()
        state, dev, host = trainer.step(state, ref_params, i)
        jax.block_until_ready(state)
        m = jax.device_get(dev)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if not all(math.isfinite(float(v)) for v in m.values()):
            raise SystemExit(f"step {i}: non-finite metrics {m}")
        timed = i >= a.warmup
        # the trainer drew the prompts that bench_trl_grpo.py gives TRL for this step
        same_prompts &= host["_samples"][0]["prompt"] == workload_examples(tok, a, i)[0]["question"]
        if i == 0:
            rss_stages["after_step_1"] = peak_rss_mib()
        print(f"[bench] step {i + 1}{'' if timed else ' (warm-up)'}: {dt:.3f}s, rollout "
              f"{host['rollout_s']:.3f}s, mean length {host['response_length']:.1f}, reward "
              f"{host['reward']:.3f}, loss {float(m['loss']):.4f}, kl {float(m['kl']):.2e}",
              file=sys.stderr)
        if i == a.warmup - 1 or (a.warmup == 0 and i == 0):
            variants = compiled_variants(trainer)
        if timed:
            times.append(dt)
            cpu.append(dc / dt)
            lengths.append(host["response_length"])
            truncated.append(host["truncated_frac"])
            tokens.append(host["response_length"] * n)
            rewards.append(host["reward"])
    if not same_prompts:
        print("[warn] the trainer drew other prompts than workload_examples (bench_trl_grpo.py "
              "gives TRL those): the seed rule of GRPOTrainer.step changed?", file=sys.stderr)
    if variants is not None and compiled_variants(trainer) != variants:
        print(f"[warn] recompiled during the timed steps: {variants} -> "
              f"{compiled_variants(trainer)}", file=sys.stderr)
    rss = peak_rss_mib()
    total_s = time.perf_counter() - t_start

    s_per_step = statistics.median(times)
    tokens_per_s = statistics.mean(tokens) / s_per_step
    fl = model_flops(hidden=cfg.hidden_size, intermediate=cfg.intermediate_size,
                     layers=cfg.num_layers, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
                     head_dim=cfg.hd, vocab=cfg.vocab_size, b=b, g=g, p=p, t=t, beta=a.beta)
    peak = jax_matmul_peak(a.peak_n, a.peak_repeats)
    achieved = fl["total"] / s_per_step
    print(f"[bench] {s_per_step * 1e3:.1f} ms/step (median of {a.steps}), {tokens_per_s:,.0f} "
          f"completion tokens/s, peak RSS {rss:.0f} MiB; {fl['total'] / 1e9:.3f} GFLOP/step -> "
          f"{achieved / 1e9:.2f} GFLOP/s = {achieved / peak:.1%} of the {a.peak_n}^3 float32 "
          f"matmul peak ({peak / 1e9:.1f} GFLOP/s)", file=sys.stderr)
    result = {
        "bench": "grpo_step", "impl": "grpo_jax", "model_dir": str(a.model_dir), "arch": cfg.arch,
        "params": cfg.num_params, "dtype": "float32", "remat": cfg.remat,
        "steps": a.steps, "warmup": a.warmup, "prompts": b, "group": g, "completions": n,
        "prompt_len": p, "new_tokens": t, "cache_windows": a.cache_windows, "stop": a.stop,
        "stop_ids": list(trainer.stop_ids),
        "temperature": 1.0, "beta": a.beta, "kl_estimator": "k3", "mu": 1, "lr": a.lr,
        "micro_batches": a.micro_batches,
        "rewards": dict(REWARD_WEIGHTS),
        "s_per_step": s_per_step, "s_per_step_all": times, "s_per_step_mean": statistics.mean(times),
        "cpu_per_wall": statistics.median(cpu), "tokens_per_s": tokens_per_s,
        "mean_completion_len": statistics.mean(lengths),
        "truncated_frac": statistics.mean(truncated), "mean_reward": statistics.mean(rewards),
        "peak_rss_mib": rss, "peak_rss_stages_mib": rss_stages,
        "model_flops_per_step": fl["total"], "flops_rollout": fl["rollout"],
        "flops_ref_forward": fl["ref_forward"], "flops_update": fl["update"],
        "achieved_flops": achieved, "matmul_peak_flops": peak, "matmul_peak_n": a.peak_n,
        "ratio_of_peak": achieved / peak, "same_prompts_as_workload": bool(same_prompts),
        "compiled_variants": compiled_variants(trainer),
        "rollout_devices": 1 if trainer.sample_mesh is None else trainer.sample_mesh.size,
        "total_s": total_s, "backend": jax.default_backend(), "jax": jax.__version__,
        "torch_imported": "torch" in sys.modules, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "malloc": malloc, "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        **cpu_info(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
