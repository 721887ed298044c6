"""Run checkpoints (orbax) and what hangs off them: resuming, reading a policy back, export.

A run directory holds, besides its logs:
  config.json            the resolved experiment config
  policy/                the policy's Hugging Face config.json and tokenizer files (no weights),
                         written at the start, so that any checkpoint can be read back alone
  checkpoints/step_N/    orbax items: params, opt_state, ref_params (when beta > 0) and meta
                         (JSON: step, data position, wall time, parameter shapes)

Orbax writes each checkpoint into a temporary directory and renames it when complete, so a kill
at any moment leaves the previous checkpoints loadable (half-written temporaries are removed the
next time the directory is opened). Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from grpo_jax import model


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the model it is being restored into."""


def _shapes(tree) -> dict[str, list[int]]:
    flat, _ = jax.tree.flatten_with_path(tree)
    return {jax.tree_util.keystr(k): list(np.shape(v)) for k, v in flat}


def _abstract(tree):
    """Shape/dtype (and sharding, when the arrays have one) of each leaf: a restore target."""
    import orbax.checkpoint as ocp

    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpointer:
    """`save(step, items, meta)` / `restore(step, targets)` over RUN_DIR/checkpoints/step_N.

    Keeps the newest `keep` checkpoints plus every multiple of `milestone_every`; saves are
    asynchronous when `async_save` (the arrays are copied before `save` returns, so training may
    donate its buffers right away); `wait()` blocks until the last save is on disk."""

    def __init__(self, root: str | os.PathLike, *, keep: int = 2, milestone_every: int = 0,
                 async_save: bool = True, read_only: bool = False):
        import orbax.checkpoint as ocp

        self.root = Path(root).absolute()
        opts = dict(step_prefix="step", read_only=read_only)
        if not read_only:
            opts.update(max_to_keep=keep, keep_period=milestone_every or None, create=True,
                        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
        elif not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: no checkpoints directory (the run saved none yet)")
        self._mgr = ocp.CheckpointManager(self.root, options=ocp.CheckpointManagerOptions(**opts))

    def steps(self) -> list[int]:
        return sorted(self._mgr.all_steps())

    def latest_step(self) -> int | None:
        return self._mgr.latest_step()

    def save(self, step: int, items: dict[str, Any], meta: dict) -> None:
        import orbax.checkpoint as ocp

        args = {k: ocp.args.StandardSave(v) for k, v in items.items() if v is not None}
        meta = {**meta, "step": step, "shapes": _shapes(items.get("params"))}
        self._mgr.save(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonSave(meta)),
                       force=True)

    def meta(self, step: int) -> dict:
        import orbax.checkpoint as ocp

        return self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, targets: dict[str, Any]) -> tuple[dict[str, Any], dict]:
        """The items named in `targets` (each a pytree like the one saved, or None for "as saved,
        as numpy") and the meta record. Parameter shapes are checked first: a checkpoint of another
        model gets an error naming the first weight that differs."""
        import orbax.checkpoint as ocp

        if step not in self.steps():
            raise FileNotFoundError(f"{self.root}: no checkpoint for step {step}; "
                                    f"available steps: {self.steps()}")
        meta = self.meta(step)
        if targets.get("params") is not None:
            want, have = _shapes(targets["params"]), meta.get("shapes", {})
            for name in sorted(set(want) | set(have)):
                if want.get(name) != have.get(name):
                    raise CheckpointMismatch(
                        f"{self.root}/step_{step} holds another model: weight {name} has shape "
                        f"{have.get(name, 'missing')} in the checkpoint but {want.get(name, 'missing')} "
                        f"in this run's model; point run_dir at a fresh directory or load the "
                        f"matching model")
        args = {k: ocp.args.StandardRestore(None if t is None else _abstract(t))
                for k, t in targets.items()}
        out = self._mgr.restore(step, args=ocp.args.Composite(**args))
        return {k: out[k] for k in targets}, meta

    def wait(self) -> None:
        self._mgr.wait_until_finished()

    def close(self) -> None:
        self._mgr.close()


# ----------------------------------------------------------------------------- the policy


def save_policy_files(run_dir: Path, cfg, tok) -> Path:
    """RUN_DIR/policy: the model's Hugging Face config.json and the tokenizer (no weights)."""
    from grpo_jax.hf_io import config_to_hf

    d = run_dir / "policy"
    tmp = run_dir / ".policy.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config_to_hf(cfg).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)
    return d


def load_policy(run_dir: str | os.PathLike, step: int | None = None, *, stage: str | None = None):
    """(cfg, params as numpy, tokenizer, step) of a run's checkpoint (default: the latest)."""
    from grpo_jax import hf_io

    run_dir = Path(run_dir)
    if stage is not None:
        run_dir = run_dir / stage
    policy = run_dir / "policy"
    if not (policy / "config.json").exists():
        raise FileNotFoundError(f"{run_dir}: not a grpo-jax run directory with checkpoints "
                                f"({policy}/config.json is missing)")
    cfg = hf_io.config_from_hf(json.loads((policy / "config.json").read_text()))
    tok = hf_io.load_tokenizer(policy, vocab_size=cfg.vocab_size)
    ckpt = Checkpointer(run_dir / "checkpoints", read_only=True)
    try:
        steps = ckpt.steps()
        if not steps:
            raise FileNotFoundError(f"{run_dir}/checkpoints: no finished checkpoint")
        step = steps[-1] if step is None else step
        items, _ = ckpt.restore(step, {"params": None})
    finally:
        ckpt.close()
    params = jax.tree.map(np.asarray, items["params"])
    want = _shapes(model.param_shapes(cfg))
    have = _shapes(params)
    if want != have:
        bad = next(k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k))
        raise CheckpointMismatch(f"{run_dir}: checkpoint weight {bad} has shape {have.get(bad)} "
                                 f"but policy/config.json implies {want.get(bad)}")
    return cfg, params, tok, step


def export(run_dir: str | os.PathLike, out_dir: str | os.PathLike, step: int | None = None, *,
           stage: str | None = None, overwrite: bool = False) -> Path:
    """Write checkpoint `step` (default: the latest) of a run as a Hugging Face directory
    (config.json, safetensors, tokenizer files). The directory appears complete or not at all."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty; choose another directory or pass "
                              f"--overwrite")
    cfg, params, tok, step = load_policy(run_dir, step, stage=stage)
    source = {"run_dir": str(Path(run_dir).absolute()), "stage": stage, "step": step}
    return save_hf_dir(params, cfg, out, tok, extra={"grpo_jax_source.json": source})


def save_hf_dir(params, cfg, out_dir: str | os.PathLike, tok, *, extra: dict | None = None) -> Path:
    """`hf_io.save` into a temporary sibling, renamed over `out_dir` when complete."""
    from grpo_jax import hf_io

    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        hf_io.save(params, cfg, tmp, tokenizer=tok)
        for name, obj in (extra or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
