"""`grpo-jax` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import dataclasses
import importlib
import sys
import time
from pathlib import Path

import tyro

COMMANDS = {
    "run": "run an experiment file: grpo-jax run experiments/NAME.py [--field value ...]",
    "eval": "pass@1, pass@k, cons@k, greedy, format, language of a model or run -> eval.json/md",
    "rejection-sample": "keep the sampled completions that pass the checks -> JSONL SFT dataset",
    "plan": "per-device memory of an experiment, and the knobs that make it fit: grpo-jax plan "
            "experiments/NAME.py --device h100",
    "sweep": "run a grid of overrides x seeds: grpo-jax sweep experiments/NAME.py --grid "
             "grpo.kl_coef=0,0.04 --seeds 2",
    "compare": "curves and a table comparing runs or sweeps: grpo-jax compare SWEEP_DIR ...",
    "demo": "make a tiny model locally, save it in Hugging Face format, reload it, and sample",
    "export": "write a run's checkpoint as a Hugging Face directory: grpo-jax export RUN_DIR OUT_DIR "
              "[--step N]",
}

# Commands whose parser lives beside their code: (module, function taking the arguments).
ENTRY_POINTS = {
    "run": ("grpo_jax.runner", "main"),
    "eval": ("grpo_jax.evaluation", "eval_main"),
    "rejection-sample": ("grpo_jax.rejection", "rejection_main"),
    "plan": ("grpo_jax.planner", "plan_main"),
    "sweep": ("grpo_jax.sweep", "sweep_main"),
    "compare": ("grpo_jax.compare", "compare_main"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportArgs:
    """Write checkpoint `step` of a run (default: its latest) as a Hugging Face directory
    (config.json, model.safetensors, tokenizer files) that `transformers` loads."""

    run_dir: tyro.conf.Positional[Path]
    out_dir: tyro.conf.Positional[Path]
    step: int | None = None  # a step with a checkpoint (see RUN_DIR/checkpoints/step_N)
    stage: str | None = None  # the stage subdirectory of a pipeline run
    overwrite: bool = False  # replace a non-empty OUT_DIR


def export(args: ExportArgs) -> None:
    from grpo_jax.checkpoints import export as export_run

    out = export_run(args.run_dir, args.out_dir, args.step, stage=args.stage,
                     overwrite=args.overwrite)
    print(f"[grpo-jax] wrote {out} (config.json, safetensors, tokenizer); load it with "
          f"transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoArgs:
    """Sample from a tiny randomly initialized Qwen2 model, end to end through the real code:
    init -> save as a Hugging Face directory -> load -> jitted KV-cache sampling."""

    out_dir: Path = Path("runs/demo_model")  # where the Hugging Face directory is written
    seed: int = 0
    prompts: int = 4
    group_size: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 0.95


def demo(args: DemoArgs) -> None:
    import jax
    import numpy as np

    from grpo_jax import hf_io, model
    from grpo_jax.config import ModelConfig, SamplerConfig
    from grpo_jax.sampler import Sampler, pad_prompts
    from grpo_jax.tasks.tokenizers import char_tokenizer

    tok = char_tokenizer()
    cfg = ModelConfig(arch="qwen2", vocab_size=128, hidden_size=256, intermediate_size=768,
                      num_layers=4, num_heads=4, num_kv_heads=2, tie_word_embeddings=True,
                      attention_bias=True)
    print(f"[demo] {cfg.num_params / 1e6:.1f}M-parameter qwen2 model, random init, jax backend: "
          f"{jax.default_backend()}")
    params = model.init_params(cfg, jax.random.key(args.seed))
    hf_io.save(params, cfg, args.out_dir, tokenizer=tok)
    cfg, params = hf_io.load(args.out_dir)
    tok = hf_io.load_tokenizer(args.out_dir, vocab_size=cfg.vocab_size)
    print(f"[demo] saved and reloaded {args.out_dir} (config.json + model.safetensors + tokenizer)")

    questions = [f"Compute {a}+{b}." for a, b in [(37, 58), (12, 9), (41, 7), (3, 88)]]
    questions = (questions * args.prompts)[:args.prompts]
    scfg = SamplerConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, stop_ids=(tok.eos_token_id,))
    tokens, mask = pad_prompts([tok(q).input_ids for q in questions], bucket=scfg.prompt_bucket,
                               pad_id=tok.pad_token_id)
    sampler = Sampler(cfg, scfg, pad_id=tok.pad_token_id)
    key = jax.random.key(args.seed + 1)
    t0 = time.perf_counter()
    out = jax.block_until_ready(sampler(params, tokens, mask, key, group_size=args.group_size))
    t1 = time.perf_counter()
    out = jax.block_until_ready(sampler(params, tokens, mask, jax.random.fold_in(key, 1),
                                        group_size=args.group_size))
    t2 = time.perf_counter()
    n_tok = int(np.asarray(out.lengths).sum())
    print(f"[demo] first call (compile + run) {t1 - t0:.2f}s; second call {t2 - t1:.3f}s, "
          f"{n_tok / (t2 - t1):,.0f} generated tokens/s")
    for i in range(min(4, len(questions) * args.group_size)):
        text = tok.decode(np.asarray(out.tokens[i])[: int(out.lengths[i])], skip_special_tokens=True)
        print(f"  prompt {questions[i // args.group_size]!r} -> {text!r} "
              f"(mean logp {float(out.logps[i].sum() / max(int(out.lengths[i]), 1)):.2f})")
    print("[demo] the model is untrained, so the text is noise; the GRPO runner trains it.")


def main(argv: list[str] | None = None) -> None:
    program = argv is None  # the `grpo-jax` program itself (not a call from Python code)
    if program:
        from grpo_jax import hostmem

        hostmem.configure()  # may restart this process once, before JAX is imported
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            print(f"grpo-jax: unknown command {argv[0]!r}\n", file=sys.stderr)
        print("usage: grpo-jax COMMAND [options]   (grpo-jax COMMAND --help for its options)\n")
        for name, text in COMMANDS.items():
            print(f"  {name:17s} {text}")
        raise SystemExit(0 if not argv or argv[0] in ("-h", "--help") else 2)
    cmd, rest = argv[0], argv[1:]
    if program:
        hostmem.trim_after_compiles()  # every command runs JAX programs
    if cmd in ENTRY_POINTS:  # imported on use: `grpo-jax --help` stays fast
        module, function = ENTRY_POINTS[cmd]
        getattr(importlib.import_module(module), function)(rest)
    if cmd == "demo":
        demo(tyro.cli(DemoArgs, args=rest, prog="grpo-jax demo"))
    if cmd == "export":
        export(tyro.cli(ExportArgs, args=rest, prog="grpo-jax export",
                        config=(tyro.conf.FlagConversionOff,)))


if __name__ == "__main__":
    main()
