"""The GRPO step of scripts/bench_grpo.py, run by TRL's `GRPOTrainer` (PyTorch, CPU, float32).

    pip install trl        # trl 1.16 keeps torch as it is; it adds accelerate, datasets, pandas
    python scripts/make_tiny_model.py --out /tmp/bench_tiny
    python scripts/bench_trl_grpo.py --model-dir /tmp/bench_tiny --steps 10

The workload is imported from bench_grpo.py (same flags, same prompts per step, same reward
functions and weights, same FLOP count); see its docstring. The TRL settings that make it the
same step:
  - one optimizer step = B prompts x G completions: per_device_train_batch_size = B * G,
    gradient_accumulation_steps = 1, num_generations = G (generation batch = train batch, so
    one generation per optimizer step), num_iterations = 1 (mu = 1: old log-probs are the
    detached current ones, as in ours), shuffle_dataset = False (step s gets the prompts of
    step s of ours);
  - loss_type = "grpo" (per-sequence token mean, then the batch mean), beta = --beta (TRL's KL
    is k3), epsilon = 0.2, scale_rewards = "group", reward_weights = (1.0, 0.3);
  - max_completion_length = T, temperature = 1, top_k = 0, top_p = 1 (the logits processors that
    `generate` really builds are reported), EOS = the tokenizer's EOS; `--stop none` adds
    min_new_tokens = T so that no completion ends early;
  - learning_rate = --lr, lr_scheduler_type = "constant", no warm-up, weight_decay = 0,
    max_grad_norm = 1.0 (AdamW, TRL/transformers' default optimizer implementation);
  - bf16 = fp16 = False, model and reference loaded with dtype float32,
    gradient_checkpointing = False, use_cpu = True, report_to = "none", no logging / saving;
  - the tokenizer is the model directory's own tokenizer.json (loaded like grpo_jax.hf_io does:
    `AutoProcessor`, TRL's default, builds a Qwen2Tokenizer for this directory that drops the
    spaces of the character tokenizer), and every prompt is checked to be exactly P tokens with
    the call TRL makes.

Timing: a TrainerCallback records on_step_begin / on_step_end of every optimizer step (generation,
rewards, reference forward, forward + backward and the optimizer step all happen in between);
after --warmup steps the median of --steps steps is `s_per_step` (`s_per_step_end_to_end`, the
median interval between consecutive step ends, also includes the trainer's loop between steps).
`peak_rss_mib` is ru_maxrss read after the timed steps, before a torch float32 matmul peak is
measured. The last line printed is one JSON object.

Run both scripts one after the other on an otherwise idle machine. With another busy process
on the cores, torch's OpenMP threads (2 by default on 2 cores) oversubscribe and a TRL step can
take 10x longer (seen here: 16-25 s at 2 threads against 1.5 s at --threads 1 under the same
load), while XLA's thread pool degrades gracefully; `cpu_per_wall` (process CPU seconds per
wall second of a step) shows how many cores each run really used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_grpo as W  # noqa: E402  (the shared workload; imports no jax)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    W.add_workload_args(ap)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args(argv)
    W.check_args(a)
    return a


def load_tokenizer(model_dir: str):
    """The directory's tokenizer, loaded by grpo_jax.hf_io (which imports no jax for this)."""
    from grpo_jax.hf_io import load_tokenizer as load

    return load(model_dir)


def trl_rewards(lengths: list[float], stopped: list[bool], prompts_seen: list[str], eos_ids: set[int]):
    """The workload's rewards as TRL reward functions (plain Python, same code as ours). The
    first one also records the completion lengths (EOS included, as ours counts them), whether
    each completion ended with EOS, and the prompts."""
    fns = W.reward_fns()

    def wrap(name, fn, record):
        def reward(prompts, completions, completion_ids=None, answer=None, **kw):
            if record and completion_ids is not None:
                lengths.extend(len(c) for c in completion_ids)
                stopped.extend(bool(c) and c[-1] in eos_ids for c in completion_ids)
                prompts_seen.extend(prompts)
            return fn(prompts, completions, answer=answer)

        reward.__name__ = name
        return reward

    return [wrap(name, fn, i == 0) for i, (name, _, fn) in enumerate(fns)], [w for _, w, _ in fns]


def torch_matmul_peak(n: int, repeats: int) -> float:
    import torch

    x, y = torch.randn(n, n, dtype=torch.float32), torch.randn(n, n, dtype=torch.float32)
    with torch.inference_mode():
        for _ in range(2):
            torch.mm(x, y)
        return 2.0 * n ** 3 / W.median_time(lambda i: torch.mm(x, y), repeats)


def main(argv=None) -> None:
    a = parse_args(argv)
    # TRL runs on glibc's default allocator (it is slower with the huge-page tunable, measured),
    # unless GRPO_JAX_MALLOC is set explicitly: then it gets the setting `grpo-jax` would use.
    from grpo_jax import hostmem

    if argv is not None:
        malloc = "unchanged (called from Python)"
    elif hostmem.ENV in os.environ:
        malloc = hostmem.configure()  # may restart this script once, before torch is imported
    else:
        malloc = "glibc default"
    t_start = time.perf_counter()
    rss_stages = {}
    import datasets
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    if a.threads:
        torch.set_num_threads(a.threads)
    b, g, p, t = a.prompts, a.group, a.prompt_len, a.new_tokens
    n, total_steps = b * g, a.warmup + a.steps
    tok = load_tokenizer(a.model_dir)
    rss_stages["after_import"] = W.peak_rss_mib()

    rows = []
    for s in range(total_steps):
        rows += W.workload_examples(tok, a, s)
    for r in rows:  # the call TRL makes (_tokenize_prompts): default special tokens
        got = len(tok(text=[r["question"]])["input_ids"][0])
        if got != p:
            raise SystemExit(f"prompt {r['question']!r} has {got} tokens under TRL's call, not {p}")
    ds = datasets.Dataset.from_list([{"prompt": r["question"], "answer": r["answer"]} for r in rows])

    lengths: list[float] = []
    stopped: list[bool] = []
    prompts_seen: list[str] = []
    reward_funcs, reward_weights = trl_rewards(lengths, stopped, prompts_seen, {tok.eos_token_id})
    gen_kwargs = {"min_new_tokens": t} if a.stop == "none" else None
    out_dir = tempfile.mkdtemp(prefix="bench_trl_grpo_")
    args = GRPOConfig(
        output_dir=out_dir, seed=a.seed, use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, report_to="none", logging_strategy="no",
        save_strategy="no", eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
        max_steps=total_steps, per_device_train_batch_size=n, gradient_accumulation_steps=1,
        num_generations=g, num_iterations=1, shuffle_dataset=False,
        max_completion_length=t, temperature=1.0, top_k=0, top_p=1.0, generation_kwargs=gen_kwargs,
        loss_type="grpo", beta=a.beta, epsilon=W.EPS_CLIP, scale_rewards="group",
        reward_weights=reward_weights, learning_rate=a.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        model_init_kwargs={"dtype": torch.float32},
    )
    trainer = GRPOTrainer(model=a.model_dir, reward_funcs=reward_funcs, args=args,
                          train_dataset=ds, processing_class=tok)
    rss_stages["after_build"] = W.peak_rss_mib()
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)

    # The logits processors `generate` builds (must be none: temperature 1, no top-k / top-p;
    # MinNewTokensLengthLogitsProcessor with --stop none).
    processors: list[str] = []
    model = trainer.model
    orig = model._get_logits_processor

    def spy(*args_, **kw):
        procs = orig(*args_, **kw)
        if not processors:
            processors.extend(type(x).__name__ for x in procs)
        return procs

    model._get_logits_processor = spy

    class Timer(TrainerCallback):
        def __init__(self):
            self.begin, self.end, self.cpu = [], [], []

        def on_step_begin(self, args, state, control, **kw):
            self.cpu.append(time.process_time())
            self.begin.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            self.end.append(time.perf_counter())
            self.cpu[-1] = (time.process_time() - self.cpu[-1]) / (self.end[-1] - self.begin[-1])
            i = len(self.end)
            if i == 1:
                rss_stages["after_step_1"] = W.peak_rss_mib()
            k = slice(n * (i - 1), n * i)
            print(f"[trl] step {i}{'' if i > a.warmup else ' (warm-up)'}: "
                  f"{self.end[-1] - self.begin[-1]:.3f}s, mean length "
                  f"{statistics.mean(lengths[k]) if lengths[k] else float('nan'):.1f}",
                  file=sys.stderr)

    timer = Timer()
    trainer.add_callback(timer)
    print(f"[trl] trl {trl.__version__}, transformers {transformers.__version__}, torch "
          f"{torch.__version__} ({torch.get_num_threads()} threads); model {model.dtype}, attn "
          f"{model.config._attn_implementation}, ref model "
          f"{None if trainer.ref_model is None else trainer.ref_model.dtype}; optimizer {args.optim}; "
          f"B={b} x G={g}, P={p}, T={t}, stop={a.stop} (eos ids {trainer.eos_token_ids})",
          file=sys.stderr)
    trainer.train()
    rss = W.peak_rss_mib()
    shutil.rmtree(out_dir, ignore_errors=True)  # nothing is saved there (save_strategy="no")
    total_s = time.perf_counter() - t_start

    if len(timer.end) != total_steps or len(lengths) != total_steps * n:
        raise SystemExit(f"expected {total_steps} steps of {n} completions, got {len(timer.end)} "
                         f"steps and {len(lengths)} completions")
    # Step s must have trained on the prompts of step s of ours, each repeated G times.
    same_prompts = prompts_seen == [r["question"] for r in rows for _ in range(g)]
    if not same_prompts:
        print("[warn] TRL did not see the prompts of bench_grpo.py in the same order",
              file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ckpt = getattr(model, "is_activation_checkpointing",
                       getattr(model, "is_gradient_checkpointing", None))
    times = [e - s for s, e in zip(timer.begin, timer.end)][a.warmup:]
    ends = timer.end[max(a.warmup - 1, 0):]
    e2e = [y - x for x, y in zip(ends, ends[1:])] or times
    timed_len = lengths[a.warmup * n:]
    s_per_step = statistics.median(times)
    tokens_per_s = sum(timed_len) / a.steps / s_per_step
    dims = W.hf_config_dims(a.model_dir)
    fl = W.model_flops(**dims, b=b, g=g, p=p, t=t, beta=a.beta)
    peak = torch_matmul_peak(a.peak_n, a.peak_repeats)
    achieved = fl["total"] / s_per_step
    params = sum(x.numel() for x in model.parameters())
    print(f"[trl] {s_per_step * 1e3:.1f} ms/step (median of {a.steps}), {tokens_per_s:,.0f} "
          f"completion tokens/s, peak RSS {rss:.0f} MiB; {achieved / 1e9:.2f} GFLOP/s = "
          f"{achieved / peak:.1%} of the torch {a.peak_n}^3 float32 matmul peak "
          f"({peak / 1e9:.1f} GFLOP/s); logits processors {processors}", file=sys.stderr)
    result = {
        "bench": "grpo_step", "impl": "trl", "model_dir": str(a.model_dir),
        "params": params, "dtype": str(model.dtype).replace("torch.", ""),
        "gradient_checkpointing": bool(args.gradient_checkpointing), "model_checkpointing": ckpt,
        "steps": a.steps, "warmup": a.warmup, "prompts": b, "group": g, "completions": n,
        "prompt_len": p, "new_tokens": t, "stop": a.stop, "eos_token_ids": list(trainer.eos_token_ids),
        "temperature": 1.0, "beta": a.beta, "loss_type": args.loss_type, "mu": args.num_iterations,
        "lr": a.lr, "rewards": dict(W.REWARD_WEIGHTS),
        "s_per_step": s_per_step, "s_per_step_all": times, "s_per_step_mean": statistics.mean(times),
        "s_per_step_end_to_end": statistics.median(e2e),
        "cpu_per_wall": statistics.median(timer.cpu[a.warmup:]), "tokens_per_s": tokens_per_s,
        "mean_completion_len": statistics.mean(timed_len),
        "truncated_frac": sum(x >= t and not e for x, e in zip(timed_len, stopped[a.warmup * n:]))
        / len(timed_len),
        "peak_rss_mib": rss, "peak_rss_stages_mib": rss_stages, "malloc": malloc,
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "model_flops_per_step": fl["total"], "achieved_flops": achieved,
        "matmul_peak_flops": peak, "matmul_peak_n": a.peak_n, "ratio_of_peak": achieved / peak,
        "logits_processors": processors, "same_prompts_as_ours": same_prompts, "optimizer": str(args.optim),
        "attn_implementation": model.config._attn_implementation,
        "trl_version": trl.__version__, "transformers": transformers.__version__,
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "jax_imported": "jax" in sys.modules, "total_s": total_s, **W.cpu_info(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
