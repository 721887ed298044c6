"""The DeepSeek-R1 recipe as ordered stages in one run directory (SPEC.md section 4).

A `Pipeline` lists stages; each names the earlier stages it takes a policy or a dataset from:

  PretrainStage   a fresh model trained on synthetic task text (the tiny experiments' base model)
  SFTStage        supervised fine-tuning from a policy on curated pairs and/or rejection-sampled
                  datasets (cold start, post-rejection SFT, distillation into a student; with
                  `teacher`, logit distillation)
  GRPOStage       a whole GRPO run (`runner.run`) starting from a policy
  RejectionStage  k samples per prompt from a policy, filtered -> dataset.jsonl + statistics
  EvalStage       pass@1, cons@k, format, language consistency, length of several policies ->
                  eval.json, and the pipeline's report.md and summary.json

RUN_DIR/STAGE/ holds each stage's outputs (hf_model/ for a policy, dataset.jsonl for rejection
sampling) and `stage.json` once the stage is complete. A pipeline run skips complete stages and
resumes at the first incomplete one: a GRPO stage from its own latest checkpoint, an SFT stage
from its saved state (STAGE/sft_state/, written every `checkpoint_minutes` and on a stop request,
removed when the stage completes), the others from their start (they are deterministic, so the
result is the same).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Literal, Union

import jax
import numpy as np

from grpo_jax.config import (DataConfig, EvalConfig, Experiment, ModelConfig,
                             PretrainConfig, _check)
from grpo_jax.rejection import RejectionConfig
from grpo_jax.sft import SFTConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class PretrainStage:
    name: str
    model: ModelConfig
    pretrain: PretrainConfig
    max_len: int = 128  # document length limit (prompt + completion tokens)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTStage:
    name: str
    policy: str  # the stage whose policy is fine-tuned
    sft: SFTConfig
    curated: int = 0  # curated cold-start pairs generated from the task (tasks.corpus)
    datasets: tuple[str, ...] = ()  # rejection stages whose accepted samples are added
    teacher: str | None = None  # logit distillation from this stage's policy (same tokenizer)
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    # the stage's state (params, optimizer, losses) is saved this often and on a stop request,
    # and an interrupted stage resumes from it (0: only on a stop request)
    checkpoint_minutes: float = 10.0

    def __post_init__(self):
        _check(self.checkpoint_minutes >= 0, f"stages.{self.name}.checkpoint_minutes",
               f"must be >= 0 (0 = only on a stop request), got {self.checkpoint_minutes}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StageModelReward:
    """A model-based reward (`rewards.model_based`) whose model is an earlier stage's policy,
    registered under `name` before the GRPO stage runs, so `experiment.rewards` can weigh it."""

    name: str
    stage: str
    kind: Literal["judge", "reward_model"] = "judge"
    options: tuple[tuple[str, Any], ...] = ()  # JudgeSpec / RewardModelSpec fields


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOStage:
    name: str
    policy: str
    experiment: Experiment  # its model, data and run_dir are set by the pipeline
    model_rewards: tuple[StageModelReward, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class RejectionStage:
    name: str
    policy: str
    prompts: int  # training prompts sampled
    rejection: RejectionConfig
    batch_prompts: int = 64


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalStage:
    name: str
    policies: tuple[tuple[str, str], ...]  # (label in the report, stage)


Stage = Union[PretrainStage, SFTStage, GRPOStage, RejectionStage, EvalStage]
POLICY_STAGES = (PretrainStage, SFTStage, GRPOStage)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pipeline:
    """Ordered stages over one task. `data` (task, template, limits) and `eval` apply to every
    stage; GRPO stages get them too."""

    seed: int = 0
    data: DataConfig
    eval: EvalConfig = EvalConfig(samples=4)
    stages: tuple[Stage, ...]
    run_dir: str | None = None
    progress: bool = True

    def __post_init__(self):
        seen: dict[str, Stage] = {}
        for st in self.stages:
            _check(st.name not in seen and st.name.isidentifier(), "stages",
                   f"stage names must be unique identifiers, got {st.name!r}")
            refs = [getattr(st, "policy", None), getattr(st, "teacher", None)]
            refs += [s for _, s in getattr(st, "policies", ())]
            refs += [m.stage for m in getattr(st, "model_rewards", ())]
            for ref in filter(None, refs):
                _check(isinstance(seen.get(ref), POLICY_STAGES), f"stages.{st.name}",
                       f"takes a policy from {ref!r}, which is not an earlier pretrain, SFT or "
                       f"GRPO stage (earlier stages: {list(seen)})")
            for ref in getattr(st, "datasets", ()):
                _check(isinstance(seen.get(ref), RejectionStage), f"stages.{st.name}",
                       f"takes a dataset from {ref!r}, which is not an earlier rejection stage")
            if isinstance(st, GRPOStage):
                _check(st.experiment.pretrain is None, f"stages.{st.name}.experiment.pretrain",
                       "must be None in a pipeline (pretraining is a PretrainStage)")
            seen[st.name] = st

    def stage(self, name: str) -> Stage:
        for st in self.stages:
            if st.name == name:
                return st
        raise KeyError(f"no stage {name!r}; the stages are {[s.name for s in self.stages]}")


# ----------------------------------------------------------------------------- running


SFT_STATE = "sft_state"  # an unfinished SFT stage's saved state, under its stage directory


class PipelineRun:
    """One pipeline in one run directory."""

    def __init__(self, pipe: Pipeline, run_dir: Path, say: Callable[[str], None], stop=None):
        from grpo_jax.tasks import get_task

        self.pipe, self.dir, self.say, self.stop = pipe, run_dir, say, stop
        self.task = get_task(pipe.data.task, **pipe.data.task_kwargs)

    def stage_dir(self, name: str) -> Path:
        return self.dir / name

    def done(self, name: str) -> dict | None:
        f = self.stage_dir(name) / "stage.json"
        return json.loads(f.read_text()) if f.exists() else None

    def policy(self, name: str):
        """(cfg, params, tokenizer) of a finished policy stage."""
        from grpo_jax import hf_io

        d = self.stage_dir(name) / "hf_model"
        if self.done(name) is None or not (d / "config.json").exists():
            raise FileNotFoundError(f"stage {name!r} has not finished ({d} is missing); run the "
                                    f"pipeline, or that stage first (--stage {name})")
        cfg, params = hf_io.load(d)
        return cfg, jax.tree.map(jax.numpy.asarray, params), hf_io.load_tokenizer(d, vocab_size=cfg.vocab_size)

    def run_stage(self, st: Stage) -> dict:
        inputs = [getattr(st, "policy", None), getattr(st, "teacher", None),
                  *getattr(st, "datasets", ()), *(s for _, s in getattr(st, "policies", ())),
                  *(m.stage for m in getattr(st, "model_rewards", ()))]
        for name in filter(None, inputs):
            if self.done(name) is None:
                raise FileNotFoundError(f"stage {name!r} has not finished, and stage {st.name!r} "
                                        f"needs its output; run the pipeline, or that stage first "
                                        f"(--stage {name})")
        d = self.stage_dir(st.name)
        # GRPO resumes from its checkpoints, an unfinished SFT stage from its state; others restart
        if not isinstance(st, GRPOStage) and (not isinstance(st, SFTStage) or self.done(st.name)):
            shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        self.say(f"stage {st.name} ({type(st).__name__})")
        out = getattr(self, f"_{type(st).__name__}")(st, d)
        record = {"stage": st.name, "kind": type(st).__name__, "wall_s": time.perf_counter() - t0,
                  **out}
        from grpo_jax.runner import atomic_write

        atomic_write(d / "stage.json", json.dumps(record, indent=2))
        shutil.rmtree(d / SFT_STATE, ignore_errors=True)  # the stage's outputs are complete
        self.say(f"stage {st.name} done in {record['wall_s']:.0f}s")
        return record

    def preempt(self, stage: str, resumes: str = "reruns from its start"):
        from grpo_jax.runner import PREEMPTED_EXIT, Preempted

        self.say(f"stopping in stage {stage}; it {resumes} on resume; exiting with code "
                 f"{PREEMPTED_EXIT}")
        raise Preempted(PREEMPTED_EXIT)

    def _save_policy(self, params, cfg, tok, d: Path) -> None:
        from grpo_jax.checkpoints import save_hf_dir

        save_hf_dir(jax.device_get(params), cfg, d / "hf_model", tok)

    def _PretrainStage(self, st: PretrainStage, d: Path) -> dict:
        from grpo_jax import model
        from grpo_jax.runner import builtin_tokenizer, pretrain

        tok = builtin_tokenizer(st.model, st.pretrain)
        key = jax.random.fold_in(jax.random.key(self.pipe.seed), sum(map(ord, st.name)))
        params = model.init_params(st.model, key)
        self.say(f"{st.name}: a {st.model.num_params / 1e6:.2f}M-parameter {st.model.arch} model")
        params = pretrain(st.pretrain, seed=self.pipe.seed, cfg=st.model, params=params, tok=tok,
                          task=self.task, template=self.pipe.data.template, max_len=st.max_len,
                          say=self.say, log_path=d / "pretrain_metrics.jsonl",
                          progress=self.pipe.progress)
        self._save_policy(params, st.model, tok, d)
        return {"params": st.model.num_params}

    def _SFTStage(self, st: SFTStage, d: Path) -> dict:
        from grpo_jax.distill import distill_logits
        from grpo_jax.rejection import read_dataset, sft_pairs
        from grpo_jax.sft import Resumable, Stopped, saved_update, train_sft_dataset
        from grpo_jax.tasks.corpus import curated_pairs

        cfg, params, tok = self.policy(st.policy)
        pairs = []
        if st.curated:
            pairs += curated_pairs(self.task, st.curated, seed=self.pipe.seed * 31 + 5,
                                   template=self.pipe.data.template)
        for name in st.datasets:
            pairs += sft_pairs(read_dataset(self.stage_dir(name) / "dataset.jsonl"))
        if not pairs:
            raise ValueError(f"stage {st.name}: no training pairs (curated=0 and the datasets "
                             f"{list(st.datasets)} are empty)")
        # a stop request saves the stage's state after the current update; a rerun resumes it
        state = Resumable(d / SFT_STATE, every_s=60.0 * st.checkpoint_minutes,
                          stop=lambda: self.stop is not None and self.stop.agreed())
        if (done := saved_update(d / SFT_STATE)) is not None:
            self.say(f"{st.name}: resuming after update {done} from its saved state "
                     f"({d / SFT_STATE})")
        try:
            if st.teacher is None:
                res = train_sft_dataset(params, cfg, tok, pairs, st.sft, resumable=state)
            else:
                t_cfg, t_params, _ = self.policy(st.teacher)
                res = distill_logits(params, cfg, t_params, t_cfg, tok, pairs, st.sft,
                                     kl_weight=st.kl_weight, ce_weight=st.ce_weight,
                                     resumable=state)
        except Stopped as e:
            self.preempt(st.name, f"resumes after update {e.step} (state saved)")
        from grpo_jax.runner import atomic_write

        atomic_write(d / "sft_metrics.jsonl", "".join(
            json.dumps({"step": i + 1, "loss": l}) + "\n" for i, l in enumerate(res.losses)))
        self._save_policy(res.params, cfg, tok, d)
        self.say(f"{st.name}: {len(pairs)} pairs, {len(res.losses)} updates, loss "
                 f"{res.losses[0]:.3f} -> {np.mean(res.losses[-5:]):.3f}")
        return {"pairs": len(pairs), "updates": len(res.losses), "final_loss": res.losses[-1],
                "heldout": res.heldout, "padding_fraction": res.padding_fraction}

    def _GRPOStage(self, st: GRPOStage, d: Path) -> dict:
        from grpo_jax.rewards.model_based import register_model_reward
        from grpo_jax.runner import run

        for m in st.model_rewards:
            register_model_reward(m.name, m.kind, path=self.stage_dir(m.stage) / "hf_model",
                                  overwrite=True, **dict(m.options))

        src = dataclasses.replace(st.experiment.model, path=str(self.stage_dir(st.policy) / "hf_model"),
                                  init=None)
        exp = dataclasses.replace(st.experiment, model=src, data=self.pipe.data, run_dir=str(d),
                                  log=dataclasses.replace(st.experiment.log,
                                                          progress=self.pipe.progress))
        summary = run(exp, name=st.name)
        return {"summary": summary}

    def _RejectionStage(self, st: RejectionStage, d: Path) -> dict:
        from grpo_jax.rejection import rejection_sample, write_dataset
        from grpo_jax.sharding import cpu_rollout_mesh

        cfg, params, tok = self.policy(st.policy)
        examples = self.task.train(st.prompts, seed=self.pipe.seed * 7 + 11 + len(st.name))
        rows, stats = rejection_sample(
            params, cfg, tok, examples, st.rejection, template=self.pipe.data.template,
            key=jax.random.fold_in(jax.random.key(self.pipe.seed), 3), source=str(self.stage_dir(st.policy)),
            max_prompt_tokens=self.pipe.data.max_prompt_tokens, batch_prompts=st.batch_prompts,
            mesh=cpu_rollout_mesh())
        write_dataset(rows, stats, d / "dataset.jsonl")
        self.say(f"{st.name}: kept {stats['accepted']} of {stats['samples']} samples "
                 f"({stats['acceptance_rate']:.1%})")
        return {"stats": stats}

    def _EvalStage(self, st: EvalStage, d: Path) -> dict:
        from grpo_jax.evaluation import evaluate_policy
        from grpo_jax.sharding import cpu_rollout_mesh

        ev, data = self.pipe.eval, self.pipe.data
        examples = self.task.eval(data.eval_problems)
        results = {}
        for label, name in st.policies:
            cfg, params, tok = self.policy(name)
            res = evaluate_policy(params, cfg, tok, examples, template=data.template,
                                  samples=ev.samples, temperature=ev.temperature, top_p=ev.top_p,
                                  max_new_tokens=self.max_new_tokens(), reward=ev.reward,
                                  max_prompt_tokens=data.max_prompt_tokens,
                                  batch_prompts=ev.batch_prompts, mesh=cpu_rollout_mesh(),
                                  key=jax.random.fold_in(jax.random.key(self.pipe.seed), 99))
            results[label] = {"stage": name, **res}
            self.say(f"{st.name}: {label} ({name}): pass@1 {res['pass_at_1']:.3f}, cons@"
                     f"{ev.samples} {res['cons_at_k']:.3f}, format {res['format_rate']:.3f}, "
                     f"language {res['language_consistency']:.3f}, length {res['mean_length']:.1f}")
        (d / "eval.json").write_text(json.dumps(results, indent=2))
        return {"results": results}

    def max_new_tokens(self) -> int:
        """The completion budget of evaluation: the largest of the GRPO stages' (or 256)."""
        budgets = [st.experiment.sampler.max_new_tokens for st in self.pipe.stages
                   if isinstance(st, GRPOStage)]
        return max(budgets, default=256)


def run_pipeline(pipe: Pipeline, name: str = "pipeline", *, only: str | None = None) -> dict:
    """Run the stages in order, skipping complete ones (or only the stage `only`, whose inputs
    must exist). Returns {stage name: its stage.json record}; writes report.md and summary.json
    when an EvalStage has run."""
    from grpo_jax.runner import (ConfigMismatch, StopRequest, atomic_write, config_diff,
                                 config_dict, say_line)

    t0 = time.perf_counter()
    run_dir = Path(pipe.run_dir or f"runs/{name}")
    run_dir.mkdir(parents=True, exist_ok=True)
    say = lambda m: say_line(f"[grpo-jax] {m}", pipe.progress)
    definition = config_dict(pipe)
    if (run_dir / "pipeline.json").exists():
        diff = config_diff(json.loads((run_dir / "pipeline.json").read_text()), definition)
        diff = [d for d in diff if not d.startswith("progress")]
        if diff:
            raise ConfigMismatch(f"{run_dir} holds a pipeline with another definition:\n  "
                                 + "\n  ".join(diff) + "\nUse a new --run-dir.")
    atomic_write(run_dir / "pipeline.json", json.dumps(definition, indent=2))
    stop = StopRequest(say)  # SIGTERM / SIGINT: stop at the next step, exit 75, resume later
    pr = PipelineRun(pipe, run_dir, say, stop)
    records = {}
    stages = [pipe.stage(only)] if only else pipe.stages
    try:
        for st in stages:
            rec = pr.done(st.name)
            if rec is not None and only is None:
                say(f"stage {st.name}: complete, skipped")
            else:
                if stop.agreed():
                    pr.preempt(st.name)
                rec = pr.run_stage(st)
            records[st.name] = rec
    finally:
        stop.restore()
    if only is None:
        write_report(pipe, pr, records, name, wall_s=sum(r["wall_s"] for r in records.values()))
    say(f"pipeline {name}: {len(stages)} stage(s) in {time.perf_counter() - t0:.0f}s here; "
        f"outputs in {run_dir}")
    return records


REPORT_KEYS = ("pass_at_1", "cons_at_k", "format_rate", "language_consistency", "mean_length")


def write_report(pipe: Pipeline, pr: PipelineRun, records: dict, name: str, wall_s: float) -> None:
    """summary.json (per evaluated policy: REPORT_KEYS; and wall_s) and report.md: the paper's
    table in miniature, the rejection-sampling statistics and the RL stages' curves."""
    from grpo_jax.runner import atomic_write

    evals = [r for r in records.values() if r["kind"] == "EvalStage"]
    if not evals:
        return
    results = evals[-1]["results"]
    summary = {label: {k: r[k] for k in REPORT_KEYS} for label, r in results.items()}
    summary["wall_s"] = wall_s
    atomic_write(pr.dir / "summary.json", json.dumps(summary, indent=2))
    k = pipe.eval.samples
    lines = [f"# {name}", "",
             f"Held-out {pipe.data.task}: {pipe.data.eval_problems} problems, {k} samples each at "
             f"temperature {pipe.eval.temperature}, top-p {pipe.eval.top_p}; pipeline wall time "
             f"{wall_s / 60:.1f} min.", "",
             f"| model | stage | pass@1 | cons@{k} | format | language consistency | mean length |",
             "|---|---|---|---|---|---|---|"]
    for label, r in results.items():
        lines.append(f"| {label} | {r['stage']} | {r['pass_at_1']:.3f} | {r['cons_at_k']:.3f} | "
                     f"{r['format_rate']:.3f} | {r['language_consistency']:.3f} | "
                     f"{r['mean_length']:.1f} |")
    rej = [(n, r["stats"]) for n, r in records.items() if r["kind"] == "RejectionStage"]
    if rej:
        lines += ["", "## Rejection sampling", "",
                  "| stage | samples | accepted | rate | prompts with one |", "|---|---|---|---|---|"]
        for n, s in rej:
            lines.append(f"| {n} | {s['samples']} | {s['accepted']} | {s['acceptance_rate']:.1%} | "
                         f"{s.get('prompts_with_accepted', '')} |")
    curves = [n for n, r in records.items() if r["kind"] == "GRPOStage"
              and (pr.stage_dir(n) / "curves.png").exists()]
    if curves:
        lines += ["", "## RL stages", ""] + [f"![{n}]({n}/curves.png)" for n in curves]
    atomic_write(pr.dir / "report.md", "\n".join(lines) + "\n")
