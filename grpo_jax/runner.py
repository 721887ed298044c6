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
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import jax
import numpy as np

from grpo_jax import hf_io, model
from grpo_jax.config import Experiment, OptimConfig, PretrainConfig
from grpo_jax.plots import plot_metrics
from grpo_jax.tasks import get_task


def load_module(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such experiment file (see experiments/)")
    spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load_experiment(path: str | Path):
    """The experiment file's `CONFIG = Experiment(...)` or `PIPELINE = Pipeline(...)`."""
    from grpo_jax.pipeline import Pipeline

    mod = load_module(path)
    cfg = getattr(mod, "CONFIG", None) or getattr(mod, "PIPELINE", None)
    if not isinstance(cfg, (Experiment, Pipeline)):
        raise TypeError(f"{path}: must define CONFIG = Experiment(...) or PIPELINE = Pipeline(...), "
                        f"found {type(cfg).__name__}")
    return cfg


def config_dict(exp: Experiment) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(exp), default=str))


class RunLog:
    """metrics.jsonl + TensorBoard + samples.jsonl + eval.jsonl, written by process 0 only.

    Resuming at step s first drops every line logged after s (a kill between checkpoints leaves
    such lines), so the files always describe one uninterrupted run."""

    FILES = ("metrics.jsonl", "samples.jsonl", "eval.jsonl")

    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int | None):
        self.dir = run_dir
        self.main = jax.process_index() == 0
        self.tb = None
        if self.main:
            for name in self.FILES:
                if resume_step is None:
                    (run_dir / name).unlink(missing_ok=True)
                else:
                    rows = [r for r in read_jsonl(run_dir / name) if r["step"] <= resume_step]
                    atomic_write(run_dir / name, "".join(json.dumps(r) + "\n" for r in rows))
        if self.main and tensorboard:
            try:
                from tensorboardX import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=(resume_step or 0) + 1)
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


def read_jsonl(path: Path) -> list[dict]:
    """The rows of a log file; a last line cut short by a kill is dropped."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not a JSON line: {line[:80]!r}") from None
    return rows


def atomic_write(path: Path, text: str) -> None:
    """Write a whole file or nothing: a temporary sibling (one per process) renamed over it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ConfigMismatch(ValueError):
    """Resuming a run directory with another config."""


class Preempted(SystemExit):
    """Raised after the checkpoint written on SIGTERM / SIGINT; the process exits with
    `PREEMPTED_EXIT`, which the launchers read as "restart me"."""


class NumericFault(RuntimeError):
    """Too many steps in a row whose updates were skipped for non-finite values."""


PREEMPTED_EXIT = 75  # EX_TEMPFAIL


def _flatten(d: dict, prefix: str = "") -> dict:
    """Dotted leaf names. A list of dicts (a pipeline's stages) is entered too, each element
    under its "name" (or its index), so that a diff names the field that changed."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flatten(v, f"{prefix}{k}.")
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v):
            for i, x in enumerate(v):
                out |= _flatten(x, f"{prefix}{k}.{x.get('name', i)}.")
            out[f"{prefix}{k}.<count>"] = len(v)
        else:
            out[f"{prefix}{k}"] = v
    return out


# Fields that say how to run, not what is computed: they may change on resume. Leaf names in
# _RUNTIME_LEAVES are such fields wherever they sit (e.g. every stage's sampler), and so is the
# whole `dist` section: where the coordinator listens and which process this is (each process
# of a multi-host run compares its own config with the one process 0 wrote).
_RUNTIME_FIELDS = ("run_dir", "allow_config_change", "log.progress")
_RUNTIME_LEAVES = ("cache_windows", "checkpoint_minutes")
_RUNTIME_SECTIONS = ("dist",)


def _runtime(key: str) -> bool:
    parts = key.split(".")
    return (key in _RUNTIME_FIELDS or parts[-1] in _RUNTIME_LEAVES
            or any(p in _RUNTIME_SECTIONS for p in parts[:-1]))


def config_diff(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and not _runtime(k)]


def make_run_dir(exp: Experiment, name: str) -> Path:
    """Create (or reopen) the run directory; refuse an unwritable one, and a resume whose config
    differs from the run's (unless allow_config_change), before anything is written."""
    if exp.run_dir:
        d = Path(exp.run_dir)
    else:
        d = Path("runs") / f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        # One probe per process: the processes of a multi-host run open the same directory.
        probe = d / f".write_test.{socket.gethostname()}.{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:  # found now, not at the first save
        raise OSError(f"{d}: the run directory is not writable ({e}); pass --run-dir DIR") from e
    new = config_dict(exp)
    if (d / "config.json").exists():
        diff = config_diff(json.loads((d / "config.json").read_text()), new)
        if diff and not exp.allow_config_change:
            raise ConfigMismatch(
                f"{d} holds a run with another config; it would resume from its checkpoint with "
                f"these fields changed:\n  " + "\n  ".join(diff) +
                "\nUse a new --run-dir, or pass --allow-config-change True to resume anyway.")
        if diff and jax.process_index() == 0:
            with open(d / "config_changes.jsonl", "a") as f:
                f.write(json.dumps({"time": datetime.datetime.now().isoformat(), "changes": diff}) + "\n")
    if jax.process_index() == 0:
        atomic_write(d / "config.json", json.dumps(new, indent=2))
    return d


def check_disk_space(run_dir: Path, cfg, exp: Experiment) -> None:
    """Stop before training when the checkpoints and the export cannot fit on the disk."""
    p = cfg.num_params * jax.numpy.dtype(cfg.param_dtype).itemsize
    per_ckpt = p * (3 + exp.grpo.uses_reference)  # params, two AdamW moments, reference
    need = per_ckpt * (exp.checkpoint.keep + 1) + p  # + one being written, + the HF export
    free = shutil.disk_usage(run_dir).free
    if need > free:
        raise OSError(f"{run_dir}: {free / 2**30:.2f} GiB free on its disk, but the checkpoints "
                      f"(keep={exp.checkpoint.keep}, {per_ckpt / 2**30:.2f} GiB each) and the "
                      f"export need about {need / 2**30:.2f} GiB; free space, lower "
                      f"--checkpoint.keep, or pass --run-dir on a larger disk")


def build_policy(exp: Experiment, say):
    """(cfg, params, tokenizer): loaded from Hugging Face, or initialized (to be pretrained)."""
    src = exp.model
    if src.path is not None:
        cfg, params = hf_io.load(src.path, param_dtype=src.param_dtype, compute_dtype=src.compute_dtype)
        cfg = src.apply(cfg)
        tok = hf_io.load_tokenizer(src.path, vocab_size=cfg.vocab_size)
        say(f"loaded {src.path}: {cfg.arch}, {cfg.num_params / 1e6:.1f}M parameters")
        return cfg, jax.tree.map(jax.numpy.asarray, params), tok
    cfg = src.apply(src.init)
    tok = builtin_tokenizer(cfg, exp.pretrain)
    params = model.init_params(cfg, jax.random.fold_in(jax.random.key(exp.seed), 7))
    say(f"initialized a {cfg.num_params / 1e6:.2f}M-parameter {cfg.arch} model")
    return cfg, params, tok


def builtin_tokenizer(cfg, pc: PretrainConfig | None):
    """The character tokenizer of a freshly initialized model (R1 tags as single tokens)."""
    from grpo_jax.tasks.tokenizers import char_tokenizer

    tok = char_tokenizer(extra_chars=pc.extra_chars if pc is not None else "", tags=True)
    if len(tok) > cfg.vocab_size:
        raise ValueError(f"model.init.vocab_size={cfg.vocab_size} is smaller than the built-in "
                         f"tokenizer ({len(tok)} tokens); raise it to at least {len(tok)}")
    return tok


def pretrain(pc: PretrainConfig, *, seed: int, cfg, params, tok, task, template: str,
             max_len: int, say, log_path: Path, progress: bool = True):
    """The tiny experiments' stand-in for a pretrained base model: next-token training on
    synthetic task text (`tasks.corpus.pretraining_pairs`)."""
    from tqdm import tqdm

    from grpo_jax.sft import train_sft
    from grpo_jax.tasks.corpus import pretraining_pairs

    say(f"pretraining on synthetic task text: {pc.steps} steps x {pc.batch_size} documents, "
        f"{pc.template_fraction:.0%} of them in the R1 answer template"
        + (f", reasoning in words, {pc.second_script:.0%} of the steps in a second script"
           if pc.words else ""))

    def batch(s):
        return pretraining_pairs(task, pc.batch_size, seed=seed * 7919 + s + 1, template=template,
                                 template_fraction=pc.template_fraction, words=pc.words,
                                 second_script=pc.second_script)

    bar = tqdm(total=pc.steps, desc="pretrain", disable=not progress, leave=False)

    def step_done(s, loss):
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    res = train_sft(params, cfg, tok, batch, steps=pc.steps, batch_size=pc.batch_size,
                    max_len=max_len, ocfg=OptimConfig(lr=pc.lr, warmup_steps=min(20, pc.steps // 10),
                                                      schedule="cosine", clip_norm=1.0),
                    prompt_loss=pc.prompt_loss, progress=step_done)
    bar.close()
    atomic_write(log_path, "".join(json.dumps({"step": i + 1, "loss": l}) + "\n"
                                   for i, l in enumerate(res.losses)))
    say(f"pretraining loss {res.losses[0]:.3f} -> {np.mean(res.losses[-10:]):.3f}")
    return res.params


def run_summary(exp: Experiment, first: dict, final: dict, rows: list[dict], eval_problems: int,
                wall_s: float, run_dir: Path) -> dict:
    """summary.json of a run: the first and final held-out evaluations, the last reward."""
    keys = ("pass_at_1", "greedy_accuracy", "format_rate", "mean_length")
    return {
        **{f"{k}_{when}": e[k] for k in keys for when, e in (("before", first), ("after", final))},
        "eval_problems": eval_problems, "eval_samples_per_problem": exp.eval.samples,
        "steps": exp.steps, "final_reward": rows[-1]["reward"] if rows else None,
        "wall_s": wall_s, "run_dir": str(run_dir),
    }


def say_line(text: str, progress: bool) -> None:
    """A log line: through tqdm while progress bars are drawn (so they are not broken), else
    printed and flushed (so that a launcher streaming the output sees it at once)."""
    if progress:
        from tqdm import tqdm

        tqdm.write(text)
    else:
        print(text, flush=True)


def multi_process(dist) -> bool:
    """Whether `init_distributed(dist)` starts several processes: an explicit coordinator, or
    (mode "auto") SLURM with several tasks or a multi-host TPU VM slice."""
    if dist.mode == "off":
        return False
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
    tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return dist.coordinator_address is not None or slurm or tpu_pod


def init_distributed(dist) -> None:
    """`jax.distributed.initialize` as `dist` (config.DistConfig) says, once per process."""
    if not multi_process(dist) or jax.distributed.is_initialized():
        return
    if dist.coordinator_address is not None:
        # CPU collectives between processes need gloo (no effect on GPU / TPU devices).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(dist.coordinator_address, dist.num_processes, dist.process_id)
        return
    jax.distributed.initialize()  # SLURM / TPU slice: JAX finds the coordinator and the ids


class StopRequest:
    """SIGTERM / SIGINT set `requested`; the run checkpoints at the next step boundary and exits
    with PREEMPTED_EXIT. A second SIGINT interrupts at once."""

    def __init__(self, say):
        self.requested, self._say, self._old = False, say, {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self._say(f"got {signal.Signals(signum).name}: checkpointing at the end of this step, then "
                  f"exiting with code {PREEMPTED_EXIT} (rerun the same command to resume)")

    def agreed(self) -> bool:
        """Whether any process was asked to stop. At a step boundary every process must take the
        same branch (a checkpoint is collective), but a signal may reach only some of them (one
        host's maintenance event, Ctrl-C in one terminal): one process saving while another
        steps into the next update's collectives would hang both. With several processes this
        is one tiny all-gather per call; with one, the local flag."""
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.asarray([self.requested]))
            self.requested = self.requested or bool(np.any(flags))
        return self.requested

    def restore(self):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def resume_policy(exp: Experiment, run_dir: Path):
    """(cfg, tokenizer) of a run being resumed: its weights come from the checkpoint."""
    src = exp.model
    if src.path is None:
        cfg = src.apply(src.init)
        return cfg, builtin_tokenizer(cfg, exp.pretrain)
    policy = run_dir / "policy"
    cfg = hf_io.config_from_hf(json.loads((policy / "config.json").read_text()),
                               param_dtype=src.param_dtype, compute_dtype=src.compute_dtype)
    return src.apply(cfg), hf_io.load_tokenizer(policy, vocab_size=cfg.vocab_size)


def run(exp: Experiment, name: str = "run") -> dict:
    """Run an experiment end to end; returns the summary (also written to summary.json).

    A run directory that already holds checkpoints is resumed from the latest one: the same
    seed and step give the same data, samples and updates, so the result is the same as that of
    an uninterrupted run, bit for bit on CPU."""
    from grpo_jax.checkpoints import Checkpointer
    from grpo_jax.trainer import GRPOTrainer

    t_start = time.perf_counter()
    init_distributed(exp.dist)
    run_dir = make_run_dir(exp, name)
    main = jax.process_index() == 0

    def say(msg):
        if main:
            say_line(f"[grpo-jax] {msg}", exp.log.progress)

    if (run_dir / "summary.json").exists():
        done = json.loads((run_dir / "summary.json").read_text())
        if done.get("steps") == exp.steps:
            say(f"{run_dir} is a finished run of {exp.steps} steps; nothing to do "
                f"(use a new --run-dir for a new run)")
            return done
        (run_dir / "summary.json").unlink()  # a finished run being extended
    for section, value in config_dict(exp).items():  # the resolved config, one line per section
        say(f"config {section}: {json.dumps(value)}")
    say(f"run directory {run_dir}  (jax {jax.__version__}, {jax.device_count()} "
        f"{jax.default_backend()} device(s))")
    task = get_task(exp.data.task, **exp.data.task_kwargs)
    ckpt = Checkpointer(run_dir / "checkpoints", keep=exp.checkpoint.keep,
                        milestone_every=exp.checkpoint.milestone_every,
                        async_save=exp.checkpoint.async_save)
    resume = ckpt.latest_step()
    if resume is None:
        cfg, params, tok = build_policy(exp, say)
    else:
        cfg, tok = resume_policy(exp, run_dir)
    check_disk_space(run_dir, cfg, exp)
    from grpo_jax.sharding import cpu_rollout_mesh, make_mesh

    mesh, sample_mesh = None, cpu_rollout_mesh()
    if sample_mesh is not None:
        say(f"rollouts and evaluations data-parallel over {sample_mesh.size} CPU devices (one per "
            f"core); training on one (--cpu_devices 1: one device for everything)")
    elif jax.device_count() > 1:
        mesh = make_mesh(exp.mesh)
        say(f"mesh {dict(mesh.shape)} over {jax.device_count()} devices in "
            f"{jax.process_count()} process(es)")
    from grpo_jax.planner import check_fits, fmt_bytes

    plan = check_fits(exp, cfg, mesh_shape=dict(mesh.shape) if mesh is not None else None)
    say(f"memory plan: {fmt_bytes(plan.total)} per device (peak in {plan.peak_phase}; "
        f"grpo-jax plan shows the items)")
    trainer = GRPOTrainer(exp, cfg, tok, task, mesh=mesh, sample_mesh=sample_mesh)
    log = RunLog(run_dir, exp.log.tensorboard, resume)
    stop = StopRequest(say)
    try:
        return _run_loop(exp, name, run_dir, task, cfg, tok, trainer, log, ckpt, stop, resume,
                         params if resume is None else None, say, t_start)
    finally:
        stop.restore()
        ckpt.wait()
        ckpt.close()
        log.close()


def _run_loop(exp, name, run_dir, task, cfg, tok, trainer, log, ckpt, stop, resume, params, say,
              t_start):
    from tqdm import tqdm

    from grpo_jax.checkpoints import save_hf_dir, save_policy_files
    from grpo_jax.evaluation import evaluate_policy
    from grpo_jax.sharding import to_host
    from grpo_jax.trainer import TrainState, finish_metrics

    main = jax.process_index() == 0
    eval_examples = task.eval(exp.data.eval_problems)
    eval_key = jax.random.fold_in(jax.random.key(exp.seed), 99)

    def run_eval(params, step):
        bar = tqdm(total=len(eval_examples), desc=f"eval@{step}", disable=not exp.log.progress,
                   leave=False)
        res = evaluate_policy(params, cfg, tok, eval_examples, template=exp.data.template,
                              max_new_tokens=exp.sampler.max_new_tokens, samples=exp.eval.samples,
                              temperature=exp.eval.temperature, top_p=exp.eval.top_p,
                              key=eval_key, batch_prompts=exp.eval.batch_prompts,
                              max_prompt_tokens=exp.data.max_prompt_tokens,
                              long_prompts=exp.data.long_prompts, reward=exp.eval.reward,
                              bucket=exp.sampler.prompt_bucket, mesh=trainer.sample_mesh,
                              progress=lambda n: bar.update(n - bar.n))
        bar.close()
        res["step"] = step
        log.eval(res)
        say(f"eval @ step {step}: pass@1 {res['pass_at_1']:.3f}, cons@{exp.eval.samples} "
            f"{res['cons_at_k']:.3f}, greedy {res['greedy_accuracy']:.3f}, format "
            f"{res['format_rate']:.3f}, language {res['language_consistency']:.3f}, "
            f"length {res['mean_length']:.1f}")
        return res

    if resume is None:
        if exp.pretrain is not None:
            params = pretrain(exp.pretrain, seed=exp.seed, cfg=cfg, params=params, tok=tok,
                              task=task, template=exp.data.template,
                              max_len=exp.data.max_prompt_tokens + exp.sampler.max_new_tokens,
                              say=say, log_path=run_dir / "pretrain_metrics.jsonl",
                              progress=exp.log.progress)
        if main:
            save_policy_files(run_dir, cfg, tok)
        state = trainer.init_state(params)
        # A copy: the update donates the state's buffers (on a mesh, in the training layout).
        ref_params = jax.tree.map(jax.numpy.copy, state.params) if exp.grpo.uses_reference else None
        wall_before, start, saved = 0.0, 0, None
    else:
        shapes = trainer.state_shapes()
        targets = {"params": shapes.params, "opt_state": shapes.opt_state}
        if exp.grpo.uses_reference:
            targets["ref_params"] = shapes.params
        items, meta = ckpt.restore(resume, targets)
        state = TrainState(params=items["params"], opt_state=items["opt_state"],
                           step=jax.numpy.int32(meta["update_step"]))
        ref_params = items.get("ref_params")
        wall_before, start, saved = meta["wall_s"], resume, resume
        say(f"resuming {run_dir} from its checkpoint at step {resume} of {exp.steps}")
    evals = read_jsonl(run_dir / "eval.jsonl")
    rows = read_jsonl(run_dir / "metrics.jsonl")

    def save(done):
        nonlocal saved
        ckpt.save(done, {"params": state.params, "opt_state": state.opt_state, "ref_params": ref_params},
                  {"update_step": int(state.step), "wall_s": wall_before + time.perf_counter() - t_start,
                   "data": {"next_step": done, "seed": exp.seed}})
        saved = done

    if exp.pretrain is not None and resume is None:
        save(0)  # the pretrained base is not worth recomputing after a crash
    say(f"GRPO: {exp.steps} steps x {exp.prompts_per_step} prompts x G={exp.grpo.group_size}, "
        f"beta={exp.grpo.kl_coef} ({exp.grpo.kl_estimator}), adv={exp.grpo.adv_norm}, "
        f"agg={exp.grpo.aggregation}, eps=({exp.grpo.eps_low}, {exp.grpo.eps_high}), "
        f"mu={exp.grpo.mu}, rewards={dict(exp.rewards.weights)}")
    pending, faults = None, []

    def flush():  # the pending step's metrics, fetched one step late so the device never waits
        nonlocal pending
        if pending is None:
            return
        row = finish_metrics(*pending)
        pending = None
        rows.append(row)
        if row["step"] % exp.log.every == 0 or row["step"] == exp.steps:
            log.metrics(row)
        if row.get("skipped_updates", 0) > 0 or row.get("nonfinite_logps", 0):
            faults.append(row["step"])
            say(f"step {row['step']}: non-finite {'sampler log-probs' if row.get('nonfinite_logps') else 'loss or gradient'}"
                f"; the update was skipped ({len(faults)} in a row)")
            if len(faults) >= exp.max_nonfinite_steps:
                raise NumericFault(
                    f"steps {faults[0]}-{faults[-1]}: {len(faults)} steps in a row had non-finite "
                    f"values and skipped their updates (max_nonfinite_steps="
                    f"{exp.max_nonfinite_steps}); stopped. The parameters are those before the "
                    f"faults; the last checkpoint is step {ckpt.latest_step()}. Try a lower "
                    f"--optim.lr, --optim.clip-norm, float32 parameters, or check the rewards.")
        else:
            faults.clear()

    def eval_due(s):
        return s == 0 or (exp.eval.every and s % exp.eval.every == 0)

    bar = tqdm(total=exp.steps, initial=start, desc="grpo", disable=not exp.log.progress)
    for step in range(start, exp.steps):
        if stop.agreed():
            flush()
            if saved != step:
                save(step)
            ckpt.wait()
            bar.close()
            say(f"checkpointed at step {step}; exiting with code {PREEMPTED_EXIT}")
            raise Preempted(PREEMPTED_EXIT)
        if eval_due(step) and not any(e["step"] == step for e in evals):
            evals.append(run_eval(state.params, step))
        if exp.grpo.ref_refresh_every and step and step % exp.grpo.ref_refresh_every == 0:
            ref_params = jax.tree.map(jax.numpy.copy, state.params)
        state, dev_metrics, host = trainer.step(state, ref_params, step)
        if exp.log.samples_every and step % exp.log.samples_every == 0:
            log.samples(host["_samples"])
        flush()
        pending = (dev_metrics, host)
        bar.update(1)
        bar.set_postfix(reward=f"{host['reward']:.3f}", acc=f"{host.get('accuracy', 0):.2f}",
                        fmt=f"{host.get('format_rate', 0):.2f}", len=f"{host['response_length']:.0f}")
        if exp.checkpoint.every and (step + 1) % exp.checkpoint.every == 0 and step + 1 < exp.steps:
            flush()
            save(step + 1)
    flush()
    bar.close()
    if stop.requested:
        say("the stop request was handled in the last step: the run is complete, finishing "
            "normally (exit 0, nothing to resume)")
    final = next((e for e in evals if e["step"] == exp.steps), None)
    if final is None:
        final = run_eval(state.params, exp.steps)
        evals.append(final)
    if saved != exp.steps:
        save(exp.steps)
    ckpt.wait()
    host_params = to_host(state.params)  # collective on several processes: all take part
    if main:
        save_hf_dir(host_params, cfg, run_dir / "hf_model", tok)
        if rows:
            plot_metrics(rows, run_dir / "curves.png", title=f"{name}: GRPO", evals=evals)
    say(f"saved {ckpt.root}/step_{exp.steps} and the Hugging Face export {run_dir / 'hf_model'}")
    summary = run_summary(exp, evals[0], final, rows, len(eval_examples),
                          wall_before + time.perf_counter() - t_start, run_dir)
    if main:
        atomic_write(run_dir / "summary.json", json.dumps(summary, indent=2))
    say(f"pass@1 {summary['pass_at_1_before']:.3f} -> {summary['pass_at_1_after']:.3f}, format "
        f"{summary['format_rate_before']:.3f} -> {summary['format_rate_after']:.3f} in "
        f"{summary['wall_s']:.0f}s; wrote {run_dir}/summary.json and curves.png")
    return summary


def main(argv: list[str]) -> None:
    """`grpo-jax run EXPERIMENT.py [--field.sub value ...]`: overrides are parsed against the
    config's field types by tyro; `--help` lists them."""
    import tyro

    if not argv or argv[0].startswith("-"):
        print("usage: grpo-jax run experiments/NAME.py [overrides]   (add --help for the fields)")
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    path, rest = argv[0], argv[1:]
    base = load_experiment(path)
    from grpo_jax.pipeline import Pipeline, run_pipeline
    from grpo_jax.sharding import use_cpu_devices

    if isinstance(base, Pipeline):
        use_cpu_devices()  # before JAX starts; rollouts, rejection sampling and evaluations
        args = tyro.cli(PipelineArgs, args=rest, prog=f"grpo-jax run {path}",
                        config=(tyro.conf.FlagConversionOff,))
        pipe = dataclasses.replace(base, run_dir=args.run_dir or base.run_dir,
                                   progress=args.progress)
        run_pipeline(pipe, name=Path(path).stem, only=args.stage)
        return
    exp = tyro.cli(Experiment, default=base, args=rest, prog=f"grpo-jax run {path}",
                   config=(tyro.conf.FlagConversionOff, tyro.conf.AvoidSubcommands))
    if not multi_process(exp.dist):
        use_cpu_devices(exp.cpu_devices)  # before JAX starts; only used on the CPU backend
    run(exp, name=Path(path).stem)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PipelineArgs:
    """A pipeline experiment: all stages in order (complete ones are skipped), or one stage."""

    run_dir: str | None = None  # default: the pipeline's run_dir, else runs/NAME
    stage: str | None = None  # run only this stage (its input stages must be complete)
    progress: bool = True
