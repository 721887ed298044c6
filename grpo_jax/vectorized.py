"""Vectorized sweeps: runs of one shape trained as ONE batched program (purejaxrl's vmap over seeds).

Runs that differ only in their seed and in scalar hyper-parameters (`VECTOR_FIELDS`: beta =
grpo.kl_coef, grpo.eps_low, grpo.eps_high, optim.lr) have the same shapes at every step. R of them
are stacked on a leading axis (params, optimizer states, PRNG streams, hyper-parameters), and
each GRPO step runs one rollout, one score and one update program for all R, `vmap`-ed over the
runs. Everything else is each run's own, as in `runner.run`: run r's data is
task.train(n, seed=seed_r * 1_000_003 + step), its keys are fold_in(stream, step) of its own
seed's streams, rewards, group selection and advantages are computed per run on the host, and
each run writes its own run directory in the runner's layout (config.json, metrics.jsonl,
samples.jsonl, eval.jsonl, checkpoints/, policy/, hf_model/, curves.png, summary.json), so that
`grpo-jax compare`, `eval` and `export` read it unchanged and a sweep skips it once finished.
Pretraining (PretrainConfig) is done once per seed and shared by every run of that seed
(`PolicyCache`), and so is the step-0 evaluation, which depends on the seed's policy only.

    vec = VectorizedGRPO(exps, cfg, tok, task)            # R experiments of one shape
    state = vec.init_state([params_0, ..., params_R-1])    # stacked TrainState
    state, dev_metrics, host_metrics = vec.step(state, ref_params, step)

    run_group(exps, names)                                 # the runner's loop for the R runs

The programs reuse the trainer's own functions (`GRPOTrainer._score_fn`, `_loss_fn`,
`_minibatch`, `_update_fn`): while the vmapped update traces, the trainer reads run r's traced
hyper-parameters where it reads its config (`_RunTrainer`), and the optimizer is the runner's
`make_optimizer` with run r's (traced) learning rate. The reference log-probs are computed for
the runs with beta > 0 only (a beta = 0 run gets a placeholder that its loss masks out, see
`loss.grpo_loss`), so a beta = 0 run costs no reference forward pass.

How close a vectorized run is to its sequential twin (`runner.run` of the same experiment): the
same data, keys, sampled tokens and updates, up to float32 rounding, not bit for bit. XLA
compiles the batched program differently from the single-run one, and on CPU that changes the
rounding: YNNPACK reductions round a row differently depending on how many rows the array has
([R, N] vs [N]); a multiply and an add are contracted into one FMA only when they land in one
fusion; scalar hyper-parameters are folded into constants in the sequential program but are
[R] arrays here; and a run whose prompts pad to a shorter bucket than the group's longest gets
extra left padding, which reorders the attention sums. Measured on the tiny configs
(tests/test_vectorized.py): metrics within ~1e-6 relative, the same sampled tokens and
evaluations, parameters within ~1e-6 after 3 steps; the 6 runs of the tiny ablation's G = 4
group still sampled the same tokens after 12 steps, parameters within 4e-6. Because a sampled
token flips when such a difference decides it, long runs eventually become different samples
of the same experiment.
(Turning off YNNPACK fusions, XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=, makes the
forward and backward passes and the rollout bitwise equal; the optimizer and loss arithmetic
still round differently.)

Timings in metrics.jsonl (rollout_s, update_s, step_s, tokens per second) and summary.json's
wall_s are each run's share of the group's: the group's time divided by R.

Speed (docs/benchmarks.md): on 2 CPU cores a batched step of R tiny runs costs about what their
R steps cost one after another (0.85x with equal prompt padding); a group saves the per-run
compilations (one program for all runs and prompt buckets), the pretraining and the step-0
evaluation of all but one run per seed. An accelerator that one tiny run leaves idle is where
the batch itself pays.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import time
import traceback
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from grpo_jax import model
from grpo_jax.config import Experiment, ModelConfig
from grpo_jax.optim import lr_schedule, make_optimizer
from grpo_jax.sampler import (Samples, decode_loop, decode_step, pad_prompts, prefill_state,
                              samples_of, untie_for_decode)
from grpo_jax.tasks.templates import format_prompt
from grpo_jax.trainer import GRPOTrainer, TrainState, host_batch, prompt_ids

# Fields that may differ between the runs of one group; everything else must agree.
VECTOR_FIELDS = ("seed", "grpo.kl_coef", "grpo.eps_low", "grpo.eps_high", "optim.lr")


class Unvectorizable(ValueError):
    """Runs that cannot share one batched program; nothing has been trained (run them one by one)."""


def incompatibilities(exps: Sequence[Experiment]) -> list[str]:
    """The config differences, outside VECTOR_FIELDS, between the first run and the others."""
    from grpo_jax.runner import config_diff, config_dict

    first = config_dict(exps[0])
    out = []
    for e in exps[1:]:
        out += [d for d in config_diff(first, config_dict(e)) if d.split(":")[0] not in VECTOR_FIELDS]
    return sorted(set(out))


# ----------------------------------------------------------------------------- rollout


def generate_runs(params, cache, tokens_RxBxP, mask_RxBxP, keys_R, *, cfg: ModelConfig, scfg,
                  group_size: int, pad_id: int):
    """`sampler._generate` for R runs at once (params, cache, prompts and keys lead with R).

    The prefill and each decode step (`sampler.prefill_state`, `sampler.decode_step`) are vmapped
    over the runs inside one `while_loop` (`sampler.decode_loop`) with a shared step counter that stops when every row of every run is done. (Vmapping `_generate`
    whole would batch the loop's predicate: JAX then selects every carry, the whole KV cache
    included, at every step and turns the cache writes into scatters: 1.5x slower on CPU.) A
    run whose rows are all done keeps stepping as no-ops (pad tokens, masks unchanged), exactly
    as done rows do in `_generate`, so its samples are those of `_generate`."""
    params, cfg = untie_for_decode(params, cfg)
    prefill = functools.partial(prefill_state, cfg=cfg, t_max=scfg.max_new_tokens,
                                group_size=group_size, pad_id=pad_id)
    one_step = functools.partial(decode_step, cfg=cfg, scfg=scfg, pad_id=pad_id)
    step = lambda s, t, forward: jax.vmap(functools.partial(one_step, forward=forward),
                                          in_axes=(0, 0, 0, None))(params, keys_R, s, t)
    with jax.named_scope("prefill"):
        init = jax.vmap(prefill)(params, cache, tokens_RxBxP, mask_RxBxP)
    with jax.named_scope("decode"):
        s = decode_loop(step, init, scfg)
    return samples_of(s, scfg), s["cache"]


# ----------------------------------------------------------------------------- training


class _View:
    """`base` with some attributes replaced: a config as the trainer reads it, with run r's
    traced hyper-parameters in place of the shared constants."""

    def __init__(self, base, **replaced):
        self.__dict__.update(_base=base, _replaced=replaced)

    def __getattr__(self, name):
        replaced = self.__dict__["_replaced"]
        return replaced[name] if name in replaced else getattr(self.__dict__["_base"], name)


class _RunTrainer(GRPOTrainer):
    """The trainer's own loss and update code, for one run of a vmapped program: inside
    `per_run(exp, tx)` (only while the update traces), `self.exp` and `self.tx` are run r's."""

    _run = None

    @property
    def exp(self):
        return self._exp if self._run is None else self._run[0]

    @exp.setter
    def exp(self, value):
        self._exp = value

    @property
    def tx(self):
        return self._tx if self._run is None else self._run[1]

    @tx.setter
    def tx(self, value):
        self._tx = value

    @contextlib.contextmanager
    def per_run(self, exp, tx):
        self._run = (exp, tx)
        try:
            yield
        finally:
            self._run = None


class VectorizedGRPO:
    """R runs of one shape as one batched program; see the module docstring. `step` returns the
    stacked state, the device metrics ([R] arrays and the runs whose update ran: fetch them
    later with `run_metrics`) and one host-metrics dict per run, in the trainer's format."""

    HYPER = {"beta": ("grpo", "kl_coef"), "eps_low": ("grpo", "eps_low"),
             "eps_high": ("grpo", "eps_high"), "lr": ("optim", "lr")}

    def __init__(self, exps: Sequence[Experiment], cfg: ModelConfig, tok, task):
        exps = list(exps)
        if diff := incompatibilities(exps):
            raise Unvectorizable("runs differ in more than " + ", ".join(VECTOR_FIELDS) + ":\n  "
                                 + "\n  ".join(diff))
        self.exps, self.runs, self.cfg, self.tok, self.task = exps, len(exps), cfg, tok, task
        exp, g = exps[0], exps[0].grpo
        self.trainer = tr = _RunTrainer(exp, cfg, tok, task)
        self.updates = max(exp.steps * g.mu * g.minibatches, 1)
        self.lr = [lr_schedule(e.optim, self.updates) for e in exps]  # host copies, for the metric
        # Per-run hyper-parameters, traced in the update: [R] float32 arrays.
        self.hyper = {h: np.array([getattr(getattr(e, sec), f) for e in exps], np.float32)
                      for h, (sec, f) in self.HYPER.items()}
        self.ref_runs = np.flatnonzero([e.grpo.uses_reference for e in exps])
        # Each run's named streams, derived as GRPOTrainer derives them from its seed.
        streams = [jax.random.split(jax.random.key(e.seed), 2) for e in exps]
        self.keys = {name: jnp.stack([s[i] for s in streams]) for i, name in enumerate(("rollout", "update"))}
        self._fold = jax.jit(jax.vmap(jax.random.fold_in, in_axes=(0, None)))
        self._split = jax.jit(jax.vmap(model.split_layers))
        # The cache is donated, as in Sampler: XLA writes into the same buffer, which we keep.
        self._rollout = jax.jit(functools.partial(
            generate_runs, cfg=cfg, scfg=tr.scfg, group_size=g.group_size, pad_id=tok.pad_token_id),
            donate_argnums=(1,))
        self._cache = None
        self._score = jax.jit(jax.vmap(tr._score_fn))
        self._ref_score = jax.jit(self._ref_logps_fn)
        self._update = jax.jit(self._update_fn, donate_argnums=(0,))

    # ------------------------------------------------------------------ programs

    def init_state(self, params: Sequence) -> TrainState:
        """The stacked training state of the runs' initial `params` (one pytree per run)."""
        return _stack([self.trainer.init_state(p) for p in params])

    def ref_params(self, params: Sequence):
        """The stacked reference weights of the runs with beta > 0 (None if there are none)."""
        return _stack([params[r] for r in self.ref_runs]) if len(self.ref_runs) else None

    def _ref_logps_fn(self, ref_params, batch):
        """[R, B, G, T] reference log-probs: scored for the runs with beta > 0 only; the others
        get their sampler log-probs, a finite placeholder that their loss masks out."""
        idx = self.ref_runs
        sub = jax.tree.map(lambda x: x[idx], batch)
        ref = jax.vmap(self.trainer._score_fn)(ref_params, sub)
        return ref if len(idx) == self.runs else batch["sampler_logps"].at[idx].set(ref)

    def _update_fn(self, state, batch, keys, hyper, active):
        exp = self.exps[0]

        def one(state, batch, key, hyper, active):
            # With no reference in the group, beta stays the constant 0 (no KL term at all).
            beta = hyper["beta"] if len(self.ref_runs) else 0.0
            grpo = _View(exp.grpo, kl_coef=beta, eps_low=hyper["eps_low"], eps_high=hyper["eps_high"])
            tx = make_optimizer(_View(exp.optim, lr=hyper["lr"]), self.updates)
            with self.trainer.per_run(_View(exp, grpo=grpo), tx):
                new, metrics = self.trainer._update_fn(state, batch, key)
            # A run whose sampler log-probs were not finite skips the step, as in the trainer.
            return jax.tree.map(lambda a, b: jnp.where(active, a, b), new, state), metrics

        return jax.vmap(one)(state, batch, keys, hyper, active)

    def _sample(self, params, tokens, mask, step: int) -> Samples:
        r, b, _ = tokens.shape
        rows, length = b * self.exps[0].grpo.group_size, self.trainer.scfg.max_new_tokens
        c = self._cache
        if not model.cache_fits(c, rows, length):
            shapes = jax.eval_shape(lambda: model.init_cache(self.cfg, rows, length))
            c = jax.tree.map(lambda s: jnp.zeros((r, *s.shape), s.dtype), shapes)
        self._cache = None
        out, self._cache = self._rollout(self._split(params), c, jnp.asarray(tokens),
                                         jnp.asarray(mask), self._fold(self.keys["rollout"], step))
        return jax.device_get(out)

    # ------------------------------------------------------------------ one step

    def step(self, state: TrainState, ref_params, step: int):
        """One GRPO iteration of every run: (state, device metrics, [host metrics per run])."""
        exp, g, tr = self.exps[0], self.exps[0].grpo, self.trainer
        t0 = time.perf_counter()
        b = exp.prompts_per_step
        n_prompts = math.ceil(b * g.dynamic_oversample) if g.zero_std == "dynamic" else b
        data = []
        for e in self.exps:
            examples = self.task.train(n_prompts, seed=e.seed * 1_000_003 + step)
            texts = [format_prompt(ex, e.data.template, self.tok) for ex in examples]
            data.append((examples, texts, prompt_ids(self.tok, texts, examples, e.data.max_prompt_tokens,
                                                     e.data.long_prompts)))
        # One padded length for all runs (the longest run's bucket): see the module docstring.
        longest = max(len(i) for _, _, ids in data for i in ids)
        padded = [pad_prompts(ids, bucket=tr.scfg.prompt_bucket, pad_id=self.tok.pad_token_id,
                              min_len=longest) for _, _, ids in data]
        p_tok, p_mask = np.stack([t for t, _ in padded]), np.stack([m for _, m in padded])
        update_steps = np.asarray(state.step)
        with jax.named_scope("rollout"):
            out = self._sample(state.params, p_tok, p_mask, step)
        t_roll = time.perf_counter() - t0

        parts = [self._host_step(r, step, *data[r][:2], jax.tree.map(lambda x: x[r], out), p_tok[r],
                                 p_mask[r], int(update_steps[r])) for r in range(self.runs)]
        batch = _stack([bt for bt, _, _ in parts], np.stack)
        active = np.array([ok for _, _, ok in parts])
        t1 = time.perf_counter()
        dev = None
        if active.any():
            with jax.named_scope("score"):
                if len(self.ref_runs):
                    batch["ref_logps"] = self._ref_score(ref_params, batch)
                if tr.reuse_rollout:
                    batch["old_logps"] = self._score(state.params, batch)
            hyper = {k: jnp.asarray(v) for k, v in self.hyper.items()}
            state, dev = self._update(state, batch, self._fold(self.keys["update"], step), hyper,
                                      jnp.asarray(active))
            jax.block_until_ready(state.params)
        t2 = time.perf_counter()

        hosts = []
        share = 1.0 / self.runs  # each run's share of the group's time
        for r, (bt, host, ok) in enumerate(parts):
            roll, upd = t_roll * share, (t2 - t1) * share
            host.update(rollout_s=roll, update_s=upd, step_s=(t2 - t0) * share,
                        rollout_tokens_per_s=float(out.lengths[r].sum()) / max(roll, 1e-9),
                        train_tokens_per_s=float(bt["gen_mask"].sum()) / max(upd, 1e-9))
            hosts.append(host)
        return state, (dev, active), hosts

    def run_metrics(self, dev) -> list[dict]:
        """The device metrics of a step, one dict per run (fetched now)."""
        metrics, active = dev
        metrics = jax.device_get(metrics)
        g = self.exps[0].grpo
        return [{k: v[r] for k, v in metrics.items()} if ok
                else {"skipped_updates": float(g.mu * g.minibatches)} for r, ok in enumerate(active)]

    def _host_step(self, r, step, examples, prompts_text, out, p_tok, p_mask, update_step):
        """Rewards, group selection, advantages and the update batch of run r: the host half of
        `GRPOTrainer.step` (`trainer.host_batch`), on the run's slice of the rollout."""
        tr = self.trainer
        return host_batch(self.exps[r], tr.scfg, self.tok, tr.rewards, step, examples,
                          prompts_text, out, p_tok, p_mask, float(self.lr[r](update_step)))


def _stack(trees: Sequence, stack=jnp.stack):
    return jax.tree.map(lambda *xs: stack(xs), *trees)


def _slice(tree, r: int):
    return jax.tree.map(lambda x: x[r], tree)


# ----------------------------------------------------------------------------- the runs


class PolicyCache:
    """The initial policies of a sweep's runs, made once per seed: runs whose seed, model,
    pretraining and task agree start from the same weights (`runner.build_policy`, then
    `runner.pretrain`), so a sweep of 12 runs over 2 seeds pretrains twice. Also keeps the
    step-0 evaluations, which depend on that policy and the evaluation settings only."""

    def __init__(self):
        self.policies: dict[str, tuple] = {}
        self.evals: dict[str, dict] = {}

    @staticmethod
    def policy_key(exp: Experiment) -> str:
        return json.dumps({"seed": exp.seed, "model": dataclasses.asdict(exp.model),
                           "pretrain": None if exp.pretrain is None else dataclasses.asdict(exp.pretrain),
                           "task": [exp.data.task, exp.data.task_args, exp.data.template],
                           "max_len": exp.data.max_prompt_tokens + exp.sampler.max_new_tokens},
                          sort_keys=True, default=str)

    @classmethod
    def eval_key(cls, exp: Experiment) -> str:
        return json.dumps([cls.policy_key(exp), dataclasses.asdict(exp.eval), exp.data.eval_problems,
                           exp.data.max_prompt_tokens, exp.data.long_prompts,
                           exp.sampler.max_new_tokens, exp.sampler.prompt_bucket],
                          sort_keys=True, default=str)

    def policy(self, exp: Experiment, run_dir: Path, say):
        """(cfg, params, tokenizer) of the run's initial policy; writes its pretraining log."""
        from grpo_jax import runner
        from grpo_jax.tasks import get_task

        key = self.policy_key(exp)
        log_path = run_dir / "pretrain_metrics.jsonl"
        if key not in self.policies:
            cfg, params, tok = runner.build_policy(exp, say)
            log = None
            if exp.pretrain is not None:
                task = get_task(exp.data.task, **exp.data.task_kwargs)
                params = runner.pretrain(exp.pretrain, seed=exp.seed, cfg=cfg, params=params, tok=tok,
                                         task=task, template=exp.data.template,
                                         max_len=exp.data.max_prompt_tokens + exp.sampler.max_new_tokens,
                                         say=say, log_path=log_path, progress=exp.log.progress)
                log = log_path.read_text()
            self.policies[key] = (cfg, params, tok, log)
        cfg, params, tok, log = self.policies[key]
        if log is not None and not log_path.exists():
            runner.atomic_write(log_path, log)
        return cfg, params, tok


def run_group(exps: Sequence[Experiment], names: Sequence[str], *,
              policies: PolicyCache | None = None, say: Callable[[str], None] = print) -> list[dict]:
    """Run (or resume) `exps` as one vectorized group, each into its own run directory, as
    `runner.run` would one by one. Returns one record per run: name, run_dir, status ("done":
    finished before, "ran", "failed" with "error" and "traceback"). A run that fails (its config
    clashes with its directory, or it stops on numeric faults) does not stop the others.

    Raises `Unvectorizable` (before training anything) when the runs differ outside
    VECTOR_FIELDS, or when their directories hold checkpoints of different steps (resume them
    one by one with `runner.run`)."""
    from grpo_jax import runner
    from grpo_jax.checkpoints import Checkpointer
    from grpo_jax.tasks import get_task

    t_start = time.perf_counter()
    exps = list(exps)
    if jax.process_count() > 1:
        raise Unvectorizable("vectorized groups run in one process; use runner.run on several hosts")
    if diff := incompatibilities(exps):
        raise Unvectorizable("runs differ in more than " + ", ".join(VECTOR_FIELDS) + ":\n  "
                             + "\n  ".join(diff))
    policies = policies if policies is not None else PolicyCache()
    records = [{"name": n, "run_dir": e.run_dir} for e, n in zip(exps, names)]
    todo, dirs, keep = [], [], []
    for i, (rec, exp, name) in enumerate(zip(records, exps, names)):
        try:
            d = runner.make_run_dir(exp, name)
        except Exception as e:  # e.g. a config that differs from the directory's run
            _fail(rec, e)
            continue
        rec["run_dir"] = str(d)
        if (d / "summary.json").exists():
            if json.loads((d / "summary.json").read_text()).get("steps") == exp.steps:
                rec["status"] = "done"
                continue
            (d / "summary.json").unlink()  # a finished run being extended
        todo.append(rec)
        dirs.append(d)
        keep.append(i)
    if not todo:
        return records
    exps = [exps[i] for i in keep]
    ckpts = [Checkpointer(d / "checkpoints", keep=e.checkpoint.keep,
                          milestone_every=e.checkpoint.milestone_every,
                          async_save=e.checkpoint.async_save) for d, e in zip(dirs, exps)]
    logs, stop = [], None
    try:
        latest = {c.latest_step() for c in ckpts}
        if len(latest) > 1:
            raise Unvectorizable(f"the runs' checkpoints are at different steps ({sorted(latest, key=str)}); "
                                 f"resume them one by one")
        resume = latest.pop()
        exp = exps[0]
        say(f"[vectorized] {len(exps)} runs as one program: "
            + ", ".join(r["name"] for r in todo)
            + ("" if resume is None else f" (resuming at step {resume})"))
        if resume is None:
            policy = [policies.policy(e, d, say) for e, d in zip(exps, dirs)]
            cfg, tok, params = policy[0][0], policy[0][2], [p for _, p, _ in policy]
        else:
            (cfg, tok), params = runner.resume_policy(exp, dirs[0]), None
        for d, e in zip(dirs, exps):
            runner.check_disk_space(d, cfg, e)
        vec = VectorizedGRPO(exps, cfg, tok, get_task(exp.data.task, **exp.data.task_kwargs))
        logs = [runner.RunLog(d, e.log.tensorboard, resume) for d, e in zip(dirs, exps)]
        stop = runner.StopRequest(say)
        failed = _train(vec, [r["name"] for r in todo], dirs, ckpts, logs, stop, resume, params,
                        policies, say, t_start)
    finally:
        if stop is not None:
            stop.restore()
        for c in ckpts:
            c.wait()
            c.close()
        for log in logs:
            log.close()
    for i, rec in enumerate(todo):
        if i in failed:
            _fail(rec, failed[i])
        else:
            rec["status"] = "ran"
    return records


def _fail(rec: dict, err: BaseException) -> None:
    rec.update(status="failed", error=f"{type(err).__name__}: {err}",
               traceback="".join(traceback.format_exception(err)))


def _train(vec: VectorizedGRPO, names, dirs, ckpts, logs, stop, resume, params, policies, say,
           t_start) -> dict[int, Exception]:
    """The runner's loop (`runner._run_loop`) for the runs of `vec`; returns the failed ones."""
    from tqdm import tqdm

    from grpo_jax import runner
    from grpo_jax.checkpoints import save_hf_dir, save_policy_files
    from grpo_jax.evaluation import evaluate_policy
    from grpo_jax.plots import plot_metrics
    from grpo_jax.trainer import finish_metrics

    exps, runs, cfg, tok = vec.exps, vec.runs, vec.cfg, vec.tok
    exp = exps[0]
    main = jax.process_index() == 0
    eval_examples = vec.task.eval(exp.data.eval_problems)
    failed: dict[int, Exception] = {}
    alive = lambda: [r for r in range(runs) if r not in failed]
    if resume is None:
        state, ref = vec.init_state(params), vec.ref_params(params)
        if main:
            for d in dirs:
                save_policy_files(d, cfg, tok)
        wall_before, start, saved = [0.0] * runs, 0, None
    else:
        shapes = jax.eval_shape(lambda: vec.trainer.init_state(model.init_params(cfg, jax.random.key(0))))
        items, metas = [], []
        for r, c in enumerate(ckpts):
            targets = {"params": shapes.params, "opt_state": shapes.opt_state}
            if exps[r].grpo.uses_reference:
                targets["ref_params"] = shapes.params
            it, meta = c.restore(resume, targets)
            items.append(it)
            metas.append(meta)
        state = TrainState(params=_stack([it["params"] for it in items]),
                           opt_state=_stack([it["opt_state"] for it in items]),
                           step=jnp.asarray([m["update_step"] for m in metas], jnp.int32))
        ref = vec.ref_params([it.get("ref_params") for it in items])
        wall_before, start, saved = [m["wall_s"] for m in metas], resume, resume
    evals = [runner.read_jsonl(d / "eval.jsonl") for d in dirs]
    rows = [runner.read_jsonl(d / "metrics.jsonl") for d in dirs]
    wall = lambda r: wall_before[r] + (time.perf_counter() - t_start) / runs  # the run's share

    def save(done):
        nonlocal saved
        pos = {r: j for j, r in enumerate(vec.ref_runs)}
        for r in alive():
            ckpts[r].save(done, {"params": _slice(state.params, r), "opt_state": _slice(state.opt_state, r),
                                 "ref_params": None if r not in pos else _slice(ref, pos[r])},
                          {"update_step": int(state.step[r]), "wall_s": wall(r),
                           "data": {"next_step": done, "seed": exps[r].seed}})
        saved = done

    def run_eval(r, step):
        e = exps[r]
        key = PolicyCache.eval_key(e) if step == 0 else None  # step 0: the seed's policy
        res = dict(policies.evals[key]) if key in policies.evals else evaluate_policy(
            _slice(state.params, r), cfg, tok, eval_examples, template=e.data.template,
            max_new_tokens=e.sampler.max_new_tokens, samples=e.eval.samples,
            temperature=e.eval.temperature, top_p=e.eval.top_p,
            key=jax.random.fold_in(jax.random.key(e.seed), 99), batch_prompts=e.eval.batch_prompts,
            max_prompt_tokens=e.data.max_prompt_tokens, long_prompts=e.data.long_prompts,
            reward=e.eval.reward, bucket=e.sampler.prompt_bucket)
        if key is not None:
            policies.evals[key] = dict(res)
        res["step"] = step
        logs[r].eval(res)
        evals[r].append(res)
        say(f"{names[r]}: eval @ step {step}: pass@1 {res['pass_at_1']:.3f}, greedy "
            f"{res['greedy_accuracy']:.3f}, format {res['format_rate']:.3f}")
        return res

    if exp.pretrain is not None and resume is None:
        save(0)  # as the runner: the pretrained base is not worth recomputing after a crash
    pending, faults = None, [[] for _ in range(runs)]

    def flush():
        nonlocal pending
        if pending is None:
            return
        dev, hosts = pending
        pending = None
        for r, m in enumerate(vec.run_metrics(dev)):
            if r in failed:
                continue
            row = finish_metrics(m, hosts[r])
            rows[r].append(row)
            if row["step"] % exps[r].log.every == 0 or row["step"] == exps[r].steps:
                logs[r].metrics(row)
            if row.get("skipped_updates", 0) > 0 or row.get("nonfinite_logps", 0):
                faults[r].append(row["step"])
                say(f"{names[r]}: step {row['step']}: non-finite values; the update was skipped "
                    f"({len(faults[r])} in a row)")
                if len(faults[r]) >= exps[r].max_nonfinite_steps:
                    failed[r] = runner.NumericFault(
                        f"steps {faults[r][0]}-{faults[r][-1]}: {len(faults[r])} steps in a row had "
                        f"non-finite values and skipped their updates (max_nonfinite_steps="
                        f"{exps[r].max_nonfinite_steps}); stopped. The last checkpoint is step "
                        f"{ckpts[r].latest_step()}.")
                    say(f"{names[r]}: {failed[r]}")
            else:
                faults[r].clear()

    eval_due = lambda s: s == 0 or (exp.eval.every and s % exp.eval.every == 0)
    bar = tqdm(total=exp.steps, initial=start, desc=f"grpo x{runs}", disable=not exp.log.progress)
    for step in range(start, exp.steps):
        if stop.agreed():
            flush()
            if saved != step:
                save(step)
            for c in ckpts:
                c.wait()
            bar.close()
            say(f"checkpointed the group at step {step}; exiting with code {runner.PREEMPTED_EXIT}")
            raise runner.Preempted(runner.PREEMPTED_EXIT)
        if eval_due(step):
            for r in alive():
                if not any(e["step"] == step for e in evals[r]):
                    run_eval(r, step)
        if exp.grpo.ref_refresh_every and step and step % exp.grpo.ref_refresh_every == 0 and ref is not None:
            ref = jax.tree.map(lambda x: x[vec.ref_runs], state.params)
        state, dev, hosts = vec.step(state, ref, step)
        if exp.log.samples_every and step % exp.log.samples_every == 0:
            for r in alive():
                logs[r].samples(hosts[r]["_samples"])
        flush()
        pending = (dev, hosts)
        bar.update(1)
        bar.set_postfix(reward=f"{np.mean([hosts[r]['reward'] for r in alive()] or [0]):.3f}")
        if exp.checkpoint.every and (step + 1) % exp.checkpoint.every == 0 and step + 1 < exp.steps:
            flush()
            save(step + 1)
        if not alive():
            break
    flush()
    bar.close()
    if not alive():
        return failed
    for r in alive():
        if not any(e["step"] == exp.steps for e in evals[r]):
            run_eval(r, exp.steps)
    if saved != exp.steps:
        save(exp.steps)
    for c in ckpts:
        c.wait()
    for r in alive():
        d, e = dirs[r], exps[r]
        final = next(x for x in evals[r] if x["step"] == e.steps)
        first = evals[r][0]
        if main:
            save_hf_dir(jax.device_get(_slice(state.params, r)), cfg, d / "hf_model", tok)
            if rows[r]:
                plot_metrics(rows[r], d / "curves.png", title=f"{names[r]}: GRPO", evals=evals[r])
        summary = runner.run_summary(e, first, final, rows[r], len(eval_examples), wall(r), d)
        if main:
            runner.atomic_write(d / "summary.json", json.dumps(summary, indent=2))
        say(f"{names[r]}: pass@1 {summary['pass_at_1_before']:.3f} -> {summary['pass_at_1_after']:.3f}, "
            f"format {summary['format_rate_before']:.3f} -> {summary['format_rate_after']:.3f}; "
            f"wrote {d}/summary.json")
    return failed
