"""The one runner: an `Experiment` in, a run directory out.

The run directory holds `config.json` (the resolved config), `metrics.jsonl`, `samples.jsonl`,
`eval.jsonl`, TensorBoard event files, `curves.png`, the final orbax checkpoint (`checkpoints/`)
and the policy exported in Hugging Face format (`hf_model/`), and `summary.json`.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import time
from pathlib import Path

import jax
import numpy as np

from grpo_jax import hf_io, model
from grpo_jax.config import Experiment, OptimConfig
from grpo_jax.plots import plot_metrics
from grpo_jax.tasks import get_task


def load_experiment(path: str | Path) -> Experiment:
    """The module-level `CONFIG` of an experiment file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such experiment file (see experiments/)")
    spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = getattr(mod, "CONFIG", None)
    if not isinstance(cfg, Experiment):
        raise TypeError(f"{path}: must define CONFIG = Experiment(...), found {type(cfg).__name__}")
    return cfg


def config_dict(exp: Experiment) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(exp), default=str))


class RunLog:
    """metrics.jsonl + TensorBoard + samples.jsonl, written by process 0 only."""

    def __init__(self, run_dir: Path, tensorboard: bool):
        self.dir = run_dir
        self.main = jax.process_index() == 0
        self.tb = None
        if self.main and tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:  # optional: metrics.jsonl has everything
                self.tb = None

    def _append(self, name: str, row: dict):
        if self.main:
            with open(self.dir / name, "a") as f:
                f.write(json.dumps(row) + "\n")

    def metrics(self, row: dict):
        self._append("metrics.jsonl", row)
        if self.tb is not None:
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, row["step"])

    def samples(self, rows: list[dict]):
        for r in rows:
            self._append("samples.jsonl", r)

    def eval(self, row: dict):
        self._append("eval.jsonl", row)
        if self.tb is not None:
            for k in ("pass_at_1", "greedy_accuracy", "format_rate", "mean_length"):
                self.tb.add_scalar(f"eval/{k}", row[k], row["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


def make_run_dir(exp: Experiment, name: str) -> Path:
    if exp.run_dir:
        d = Path(exp.run_dir)
    else:
        d = Path("runs") / f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    d.mkdir(parents=True, exist_ok=True)
    probe = d / ".write_test"
    try:  # find an unwritable run directory now, not at the first save
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"{d}: the run directory is not writable ({e}); pass --run-dir DIR") from e
    return d


def build_policy(exp: Experiment, say):
    """(cfg, params, tokenizer): loaded from Hugging Face, or initialized (and pretrained)."""
    src = exp.model
    if src.path is not None:
        cfg, params = hf_io.load(src.path, param_dtype=src.param_dtype, compute_dtype=src.compute_dtype)
        cfg = dataclasses.replace(cfg, remat=src.remat)
        tok = hf_io.load_tokenizer(src.path, vocab_size=cfg.vocab_size)
        say(f"loaded {src.path}: {cfg.arch}, {cfg.num_params / 1e6:.1f}M parameters")
        return cfg, jax.tree.map(jax.numpy.asarray, params), tok
    from grpo_jax.tasks.tokenizers import char_tokenizer

    tok = char_tokenizer(tags=True)
    cfg = dataclasses.replace(src.init, remat=src.remat)
    if len(tok) > cfg.vocab_size:
        raise ValueError(f"model.init.vocab_size={cfg.vocab_size} is smaller than the built-in "
                         f"tokenizer ({len(tok)} tokens)")
    params = model.init_params(cfg, jax.random.fold_in(jax.random.key(exp.seed), 7))
    say(f"initialized a {cfg.num_params / 1e6:.2f}M-parameter {cfg.arch} model")
    return cfg, params, tok


def pretrain(exp: Experiment, cfg, params, tok, task, say, log_path: Path):
    """The tiny experiments' stand-in for a pretrained base model."""
    from tqdm import tqdm

    from grpo_jax.sft import train_sft
    from grpo_jax.tasks.corpus import pretraining_pairs

    pc = exp.pretrain
    say(f"pretraining on synthetic task text: {pc.steps} steps x {pc.batch_size} documents, "
        f"{pc.template_fraction:.0%} of them in the R1 answer template")

    def batch(s):
        return pretraining_pairs(task, pc.batch_size, seed=exp.seed * 7919 + s + 1,
                                 template=exp.data.template, template_fraction=pc.template_fraction)

    max_len = exp.data.max_prompt_tokens + exp.sampler.max_new_tokens
    bar = tqdm(total=pc.steps, desc="pretrain", disable=not exp.log.progress, leave=False)

    def progress(s, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    res = train_sft(params, cfg, tok, batch, steps=pc.steps, batch_size=pc.batch_size,
                    max_len=max_len, ocfg=OptimConfig(lr=pc.lr, warmup_steps=min(20, pc.steps // 10),
                                                      schedule="cosine", clip_norm=1.0),
                    prompt_loss=pc.prompt_loss, progress=progress)
    bar.close()
    with open(log_path, "w") as f:
        for i, l in enumerate(res.losses):
            f.write(json.dumps({"step": i + 1, "loss": l}) + "\n")
    say(f"pretraining loss {res.losses[0]:.3f} -> {np.mean(res.losses[-10:]):.3f}")
    return res.params


def run(exp: Experiment, name: str = "run") -> dict:
    """Run an experiment end to end; returns the summary (also written to summary.json)."""
    from tqdm import tqdm

    from grpo_jax.trainer import GRPOTrainer, evaluate, finish_metrics

    t_start = time.perf_counter()
    run_dir = make_run_dir(exp, name)
    main = jax.process_index() == 0

    def say(msg):
        if main:
            (tqdm.write if exp.log.progress else print)(f"[grpo-jax] {msg}")

    if main:
        resolved = config_dict(exp)
        (run_dir / "config.json").write_text(json.dumps(resolved, indent=2))
        for section, value in resolved.items():  # the resolved config, one line per section
            say(f"config {section}: {json.dumps(value)}")
    say(f"run directory {run_dir}  (jax {jax.__version__}, {jax.device_count()} "
        f"{jax.default_backend()} device(s))")
    task = get_task(exp.data.task, **exp.data.task_kwargs)
    cfg, params, tok = build_policy(exp, say)
    if exp.pretrain is not None:
        params = pretrain(exp, cfg, params, tok, task, say, run_dir / "pretrain_metrics.jsonl")
    log = RunLog(run_dir, exp.log.tensorboard)

    eval_examples = task.eval(exp.data.eval_problems)
    eval_key = jax.random.fold_in(jax.random.key(exp.seed), 99)

    def run_eval(params, step):
        bar = tqdm(total=len(eval_examples), desc=f"eval@{step}", disable=not exp.log.progress,
                   leave=False)
        res = evaluate(params, cfg, tok, eval_examples, template=exp.data.template,
                       max_new_tokens=exp.sampler.max_new_tokens, samples=exp.eval.samples,
                       temperature=exp.eval.temperature, top_p=exp.eval.top_p,
                       key=eval_key, batch_prompts=exp.eval.batch_prompts,
                       max_prompt_tokens=exp.data.max_prompt_tokens,
                       bucket=exp.sampler.prompt_bucket,
                       progress=lambda n: bar.update(n - bar.n))
        bar.close()
        res["step"] = step
        log.eval(res)
        say(f"eval @ step {step}: pass@1 {res['pass_at_1']:.3f} (k={exp.eval.samples}), greedy "
            f"{res['greedy_accuracy']:.3f}, format {res['format_rate']:.3f}, "
            f"length {res['mean_length']:.1f}")
        return res

    evals = [run_eval(params, 0)]
    trainer = GRPOTrainer(exp, cfg, tok, task)
    state = trainer.init_state(params)
    ref_params = jax.tree.map(jax.numpy.copy, params) if exp.grpo.uses_reference else None
    say(f"GRPO: {exp.steps} steps x {exp.prompts_per_step} prompts x G={exp.grpo.group_size}, "
        f"beta={exp.grpo.kl_coef} ({exp.grpo.kl_estimator}), adv={exp.grpo.adv_norm}, "
        f"agg={exp.grpo.aggregation}, eps=({exp.grpo.eps_low}, {exp.grpo.eps_high}), "
        f"mu={exp.grpo.mu}, rewards={dict(exp.rewards.weights)}")
    rows, pending = [], None
    bar = tqdm(total=exp.steps, desc="grpo", disable=not exp.log.progress)
    for step in range(exp.steps):
        if exp.grpo.ref_refresh_every and step and step % exp.grpo.ref_refresh_every == 0:
            ref_params = jax.tree.map(jax.numpy.copy, state.params)
        state, dev_metrics, host = trainer.step(state, ref_params, step)
        if exp.log.samples_every and step % exp.log.samples_every == 0:
            log.samples(host["_samples"])
        if pending is not None:  # the previous step's metrics, fetched one step late
            rows.append(finish_metrics(*pending))
            if rows[-1]["step"] % exp.log.every == 0:
                log.metrics(rows[-1])
        pending = (dev_metrics, host)
        if exp.checkpoint.every and (step + 1) % exp.checkpoint.every == 0 and step + 1 < exp.steps:
            save_checkpoint(run_dir, state, step + 1, exp.checkpoint.keep)
        bar.update(1)
        bar.set_postfix(reward=f"{host['reward']:.3f}", acc=f"{host.get('accuracy', 0):.2f}",
                        fmt=f"{host.get('format_rate', 0):.2f}", len=f"{host['response_length']:.0f}")
        if exp.eval.every and (step + 1) % exp.eval.every == 0 and step + 1 < exp.steps:
            evals.append(run_eval(state.params, step + 1))
    if pending is not None:
        rows.append(finish_metrics(*pending))
        log.metrics(rows[-1])
    bar.close()
    final = run_eval(state.params, exp.steps) if exp.steps else evals[0]
    if exp.steps:
        evals.append(final)

    save_final(run_dir, state, cfg, tok, exp, say)
    if main and rows:
        plot_metrics(rows, run_dir / "curves.png", title=f"{name}: GRPO", evals=evals)
    log.close()
    summary = {
        "pass_at_1_before": evals[0]["pass_at_1"], "pass_at_1_after": final["pass_at_1"],
        "greedy_accuracy_before": evals[0]["greedy_accuracy"],
        "greedy_accuracy_after": final["greedy_accuracy"],
        "format_rate_before": evals[0]["format_rate"], "format_rate_after": final["format_rate"],
        "mean_length_before": evals[0]["mean_length"], "mean_length_after": final["mean_length"],
        "eval_problems": len(eval_examples), "eval_samples_per_problem": exp.eval.samples,
        "steps": exp.steps, "final_reward": rows[-1]["reward"] if rows else None,
        "wall_s": time.perf_counter() - t_start, "run_dir": str(run_dir),
    }
    if main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    say(f"pass@1 {summary['pass_at_1_before']:.3f} -> {summary['pass_at_1_after']:.3f}, format "
        f"{summary['format_rate_before']:.3f} -> {summary['format_rate_after']:.3f} in "
        f"{summary['wall_s']:.0f}s; wrote {run_dir}/summary.json and curves.png")
    return summary


def save_checkpoint(run_dir: Path, state, step: int, keep: int) -> Path:
    """An orbax checkpoint of (params, optimizer state, step) at checkpoints/step_N; only the
    newest `keep` step_* directories are kept (the final one is never deleted)."""
    import shutil

    import orbax.checkpoint as ocp

    root = run_dir / "checkpoints"
    ckpt = (root / f"step_{step}").absolute()
    with ocp.StandardCheckpointer() as saver:
        saver.save(ckpt, {"params": state.params, "opt_state": state.opt_state, "step": state.step},
                   force=True)
    if jax.process_index() == 0:
        old = sorted(root.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[:-max(keep, 1)]
        for p in old:
            shutil.rmtree(p, ignore_errors=True)
    return ckpt


def save_final(run_dir: Path, state, cfg, tok, exp: Experiment, say):
    """The final orbax checkpoint and a Hugging Face export of the policy."""
    ckpt = save_checkpoint(run_dir, state, exp.steps, exp.checkpoint.keep)
    if jax.process_index() == 0:
        hf_io.save(jax.device_get(state.params), cfg, run_dir / "hf_model", tokenizer=tok)
    say(f"saved {ckpt} and the Hugging Face export {run_dir / 'hf_model'}")


def main(argv: list[str]) -> None:
    """`grpo-jax run EXPERIMENT.py [--field.sub value ...]`: overrides are parsed against the
    config's field types by tyro; `--help` lists them."""
    import tyro

    if not argv or argv[0].startswith("-"):
        print("usage: grpo-jax run experiments/NAME.py [overrides]   (add --help for the fields)")
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    path, rest = argv[0], argv[1:]
    base = load_experiment(path)
    exp = tyro.cli(Experiment, default=base, args=rest, prog=f"grpo-jax run {path}",
                   config=(tyro.conf.FlagConversionOff, tyro.conf.AvoidSubcommands))
    run(exp, name=Path(path).stem)
