"""Sweeps: one base experiment, a grid of dotted-field overrides, and seeds.

    grpo-jax sweep experiments/NAME.py --grid grpo.kl_coef=0,0.01,0.04 --grid grpo.group_size=4,8 \
        --seeds 2 --hold completions [--out DIR] [--set field=value ...]

Every combination x seed is one run directory under the sweep directory, named by the swept
values (`kl_coef=0.01,group_size=4,seed=1`); `sweep.json` holds the definition. Rerunning the same
command resumes: finished runs (summary.json present) are skipped, unfinished ones are run again
in their directory. Runs are ordered seed-major (every setting with the first seed, then the
next seed), so a sweep cut short still covers the whole grid. An experiment file may declare
`SWEEP = Sweep(...)`, used when no --grid is given.

Vectorized runs (`--vectorize`, on by default for models of at most VECTORIZE_MAX_PARAMS
parameters; `--no-vectorize` runs every run alone): runs that differ only in the seed and in
scalar hyper-parameters (grpo.kl_coef, grpo.eps_low, grpo.eps_high, optim.lr) are trained
together as one batched program (`grpo_jax.vectorized`), each still written to its own run
directory; pretraining is shared by the runs of a seed. `sweep.json` and each run's
`sweep_run.json` record which runs were vectorized together.

Fair comparisons when G varies (`hold`): "prompts" keeps prompts_per_step B fixed, so a larger G
also samples more completions per step; "completions" keeps N = B * G at the base's value
(B = N_base // G), so every run samples and trains on the same number of completions per step.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import difflib
import importlib.util
import itertools
import json
import os
import sys
import traceback
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import tyro

from grpo_jax.config import Experiment

Hold = Literal["prompts", "completions"]
# Paper symbols and common names, only to suggest the right field in an error message.
SYMBOLS = {"beta": "grpo.kl_coef", "g": "grpo.group_size", "mu": "grpo.mu", "eps": "grpo.eps_low",
           "epsilon": "grpo.eps_low", "lr": "optim.lr", "learning_rate": "optim.lr", "b": "prompts_per_step",
           "batch_size": "prompts_per_step", "temperature": "sampler.temperature"}
NOT_SWEPT = {"seed": "use --seeds (seed i runs with base seed + i)",
             "run_dir": "each run's directory is chosen by the sweep"}


# Models up to this many parameters are vectorized by default (a batched program pays off while
# one run leaves the device idle; measured in docs/benchmarks.md).
VECTORIZE_MAX_PARAMS = 5_000_000


class SweepError(ValueError):
    """A sweep definition that cannot run; the message says what to change."""


# ----------------------------------------------------------------------------- field types


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _is_union(tp) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _section(tp):
    """The dataclass type behind `tp` (or `tp | None`), else None."""
    for t in (typing.get_args(tp) if _is_union(tp) else (tp,)):
        if dataclasses.is_dataclass(t):
            return t
    return None


def field_paths(cls=Experiment, prefix: str = "") -> list[str]:
    """Every settable dotted field of `cls`, nested sections included."""
    out = []
    for name, tp in _hints(cls).items():
        out.append(prefix + name)
        if (sub := _section(tp)) is not None:
            out += field_paths(sub, f"{prefix}{name}.")
    return out


def _unknown(path: str) -> SweepError:
    paths = field_paths()
    leaf = path.rsplit(".", 1)[-1]
    hints = [p for p in paths if p.rsplit(".", 1)[-1] == leaf]
    hints += difflib.get_close_matches(path, paths, n=1, cutoff=0.6)
    if leaf.lower() in SYMBOLS:
        hints.insert(0, SYMBOLS[leaf.lower()])
    hints = list(dict.fromkeys(h for h in hints if h != path))
    hint = f"; did you mean {' or '.join(repr(h) for h in hints[:3])}?" if hints else ""
    return SweepError(f"unknown field {path!r}{hint} (fields are dotted paths into Experiment, "
                      f"e.g. 'grpo.kl_coef', 'prompts_per_step')")


def field_type(path: str):
    """The declared type of dotted field `path` of Experiment."""
    cls, tp = Experiment, None
    parts = path.split(".")
    for i, part in enumerate(parts):
        if cls is None:
            raise SweepError(f"{'.'.join(parts[:i])} is a value, not a section: unknown field {path!r}")
        hints = _hints(cls)
        if part not in hints:
            raise _unknown(path)
        tp = hints[part]
        cls = _section(tp)
    return tp


# ----------------------------------------------------------------------------- values


def _split_top(text: str, sep: str = ",") -> list[str]:
    """Split on `sep` outside brackets and quotes: "1,(2,3),'a,b'" -> ["1", "(2,3)", "'a,b'"]."""
    parts, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
            continue
        cur += ch
    return parts + [cur]


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def coerce(value: Any, tp, path: str) -> Any:
    """`value` (a Python value, or command-line text) as a value of type `tp` for field `path`;
    a SweepError names the field, the type and the bad value."""
    if _is_union(tp):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, path)
            except SweepError as e:
                errors.append(str(e))
        raise SweepError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of "
                         f"{[a for a in args]}: " + "; ".join(errors))
    if typing.get_origin(tp) is Literal:
        allowed = typing.get_args(tp)
        v = _unquote(value) if isinstance(value, str) else value
        if v not in allowed:
            raise SweepError(f"{path}: {value!r} is not one of {list(allowed)}")
        return v
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        first = dataclasses.fields(tp)[0].name
        raise SweepError(f"{path} is a section ({tp.__name__}), not a value: set its fields, "
                         f"e.g. {path}.{first}")
    if typing.get_origin(tp) is tuple:
        v = value
        if isinstance(v, str):
            try:
                v = ast.literal_eval(v) if v.strip() else ()
            except (ValueError, SyntaxError):
                raise SweepError(f"{path}: expected a tuple such as (1, 2), got {value!r}") from None
        if not isinstance(v, (tuple, list)):
            v = (v,)
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            elems = [args[0]] * len(v)
        elif len(args) == len(v):
            elems = list(args)
        else:
            raise SweepError(f"{path}: expected a tuple of {len(args)} items {args}, got {value!r}")
        return tuple(coerce(x, t, f"{path}[{i}]") for i, (x, t) in enumerate(zip(v, elems)))
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise SweepError(f"{path}: expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            raise SweepError(f"{path}: expected an int, got {value!r}") from None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(str(value).strip())
        except ValueError:
            raise SweepError(f"{path}: expected a float, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise SweepError(f"{path}: expected a string, got {value!r}")
        return _unquote(value)
    raise SweepError(f"{path}: fields of type {tp} cannot be set from a sweep")


def parse_assignment(text: str, many: bool) -> tuple[str, Any]:
    """"grpo.kl_coef=0,0.01" -> ("grpo.kl_coef", (0.0, 0.01)) (many) or one value (not many)."""
    path, eq, rhs = text.partition("=")
    path = path.strip().removeprefix("--")
    if not eq or not path:
        raise SweepError(f"{text!r}: expected FIELD=VALUE{',VALUE...' if many else ''}, "
                         f"e.g. grpo.kl_coef={'0,0.01' if many else '0.01'}")
    tp = field_type(path)
    if not many:
        return path, coerce(rhs, tp, path)
    items = [s for s in _split_top(rhs) if s.strip()]
    if not items:
        raise SweepError(f"{text!r}: no values for {path}")
    return path, tuple(coerce(s, tp, path) for s in items)


def apply_overrides(obj, overrides: dict[str, Any]):
    """`obj` with the dotted-field `overrides` applied by `dataclasses.replace`, each nested
    config rebuilt once with all of its changes (so its validation sees them together)."""
    tree: dict = {}
    for path, value in overrides.items():
        node = tree
        *heads, last = path.split(".")
        for h in heads:
            node = node.setdefault(h, {})
            if not isinstance(node, dict):
                raise SweepError(f"{path}: conflicts with an override of its section")
        node[last] = ("value", value)
    return _apply(obj, tree, "")


def _apply(obj, tree: dict, prefix: str):
    changes = {}
    for name, sub in tree.items():
        if isinstance(sub, tuple):
            changes[name] = sub[1]
            continue
        cur = getattr(obj, name)
        if cur is None:
            raise SweepError(f"{prefix}{name} is None in the base config, so "
                             f"{prefix}{name}.{next(iter(sub))} cannot be set; set the whole "
                             f"section in the experiment file first")
        changes[name] = _apply(cur, sub, f"{prefix}{name}.")
    return dataclasses.replace(obj, **changes)


def _jsonable(v):
    if dataclasses.is_dataclass(v):
        return json.loads(json.dumps(dataclasses.asdict(v), default=str))
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return v


def format_value(v) -> str:
    """A value as it appears in a run name: 0.01, 4, true, token_mean, (1_2)."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (tuple, list)):
        return "(" + "_".join(format_value(x) for x in v) + ")"
    if dataclasses.is_dataclass(v):
        return json.dumps(_jsonable(v), sort_keys=True).replace(" ", "")
    return str(v).replace("/", "_").replace(" ", "_")


def short_names(paths: list[str]) -> list[str]:
    """Each dotted path by its last component where that names one field of Experiment only
    (kl_coef, group_size), else in full (eval.every, pretrain.steps)."""
    leaves = [p.rsplit(".", 1)[-1] for p in field_paths()]
    out = []
    for p in paths:
        leaf = p.rsplit(".", 1)[-1]
        unique = leaves.count(leaf) == 1 and sum(q.rsplit(".", 1)[-1] == leaf for q in paths) == 1
        out.append(leaf if unique else p)
    return out


# ----------------------------------------------------------------------------- the sweep


@dataclasses.dataclass(frozen=True, kw_only=True)
class Sweep:
    """`grid`: ((dotted field, (values...)), ...), every combination is run; `seeds`: runs per
    combination, seed i using the base seed + i; `hold`: what stays equal when G varies,
    "prompts" (B) or "completions" (N = B * G, so B = N_base // G)."""

    grid: tuple[tuple[str, tuple], ...] = ()
    seeds: int = 1
    hold: Hold = "prompts"

    def __post_init__(self):
        if self.seeds < 1:
            raise SweepError(f"seeds: must be >= 1, got {self.seeds}")
        if self.hold not in ("prompts", "completions"):
            raise SweepError(f"hold: got {self.hold!r}, allowed values are ['completions', 'prompts']")
        grid, seen = [], set()
        for item in self.grid:
            if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
                raise SweepError(f"grid: each entry is (dotted field, (values...)), got {item!r}")
            path, values = item
            if path in NOT_SWEPT:
                raise SweepError(f"grid: {path!r} cannot be swept: {NOT_SWEPT[path]}")
            if path in seen:
                raise SweepError(f"grid: {path!r} appears twice")
            if path == "prompts_per_step" and self.hold == "completions":
                raise SweepError("grid: hold='completions' derives prompts_per_step from the group "
                                 "size; sweep it with hold='prompts'")
            seen.add(path)
            tp = field_type(path)
            values = values if isinstance(values, (tuple, list)) else (values,)
            typed = tuple(coerce(v, tp, path) for v in values)
            if not typed:
                raise SweepError(f"grid: no values for {path!r}")
            if len({json.dumps(_jsonable(v), sort_keys=True) for v in typed}) < len(typed):
                raise SweepError(f"grid: {path!r} repeats a value: {list(typed)}")
            grid.append((path, typed))
        object.__setattr__(self, "grid", tuple(grid))

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(p for p, _ in self.grid)

    def to_json(self) -> dict:
        return {"grid": [[p, _jsonable(list(vs))] for p, vs in self.grid], "seeds": self.seeds,
                "hold": self.hold}


def plan_runs(base: Experiment, sweep: Sweep, root: str | Path | None = None
              ) -> list[tuple[str, Experiment]]:
    """(run name, experiment) for every combination x seed, seed-major; pure. With `root`, each
    experiment's run_dir is root/name. Every run is validated here, before any starts."""
    paths = list(sweep.fields)
    shorts = short_names(paths)
    n_base = base.completions_per_step
    runs = []
    for i in range(sweep.seeds):
        seed = base.seed + i
        for combo in itertools.product(*(vs for _, vs in sweep.grid)):
            overrides = dict(zip(paths, combo), seed=seed)
            name = ",".join([f"{s}={format_value(v)}" for s, v in zip(shorts, combo)]
                            + [f"seed={seed}"])
            why = ""
            if sweep.hold == "completions":
                g = overrides.get("grpo.group_size", base.grpo.group_size)
                if n_base % g:
                    raise SweepError(
                        f"run {name}: hold='completions' keeps N = prompts_per_step x G = "
                        f"{base.prompts_per_step} x {base.grpo.group_size} = {n_base} completions per "
                        f"step, which G = {g} does not divide; choose group sizes that divide {n_base} "
                        f"or use --hold prompts")
                overrides["prompts_per_step"] = n_base // g
                why = (f" (hold='completions' sets prompts_per_step = {n_base} // G={g} = "
                       f"{n_base // g})")
            try:
                exp = apply_overrides(base, overrides)
            except SweepError:
                raise
            except (ValueError, TypeError) as e:
                raise SweepError(f"run {name}: the experiment rejects this combination{why}: {e}") from None
            if root is not None:
                exp = dataclasses.replace(exp, run_dir=str(Path(root) / name))
            runs.append((name, exp))
    names = [n for n, _ in runs]
    if len(set(names)) != len(names):
        raise SweepError(f"two runs would share a directory name: {sorted(names)}")
    return runs


def definition(base: Experiment, sweep: Sweep) -> dict:
    """What must match for a sweep directory to be resumed: resolved base config and the sweep."""
    from grpo_jax.runner import config_dict

    return {"base": config_dict(dataclasses.replace(base, run_dir=None)), **sweep.to_json()}


def flatten(d: dict, prefix: str = "") -> dict:
    """A nested config dict as {dotted path: leaf value}."""
    if isinstance(d, dict) and d:
        out = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d} if prefix else {}


def definition_diff(saved: dict, now: dict) -> list[str]:
    """Human-readable differences between two sweep definitions (empty when they agree)."""
    diffs = []
    a, b = flatten(saved.get("base", {})), flatten(now.get("base", {}))
    for k in sorted(set(a) | set(b)):
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            diffs.append(f"base config {k}: {a.get(k, '<absent>')!r} in sweep.json, now {b.get(k, '<absent>')!r}")
    ga, gb = dict((p, v) for p, v in saved.get("grid", [])), dict((p, v) for p, v in now.get("grid", []))
    for p in list(ga) + [p for p in gb if p not in ga]:
        if p not in gb:
            diffs.append(f"grid {p}: {ga[p]} in sweep.json, not in the new grid")
        elif p not in ga:
            diffs.append(f"grid {p}: new in the grid ({gb[p]}), not in sweep.json")
        elif ga[p] != gb[p]:
            diffs.append(f"grid {p}: {ga[p]} in sweep.json, now {gb[p]}")
    if list(ga) == list(gb) and [p for p, _ in saved.get("grid", [])] != [p for p, _ in now.get("grid", [])]:
        diffs.append("grid order differs")
    for k in ("seeds", "hold"):
        if saved.get(k) != now.get(k):
            diffs.append(f"{k}: {saved.get(k)!r} in sweep.json, now {now.get(k)!r}")
    return diffs


def check_or_write_definition(out: Path, defn: dict, meta: dict, write: bool = True) -> None:
    """Write out/sweep.json, or check that the saved one matches `defn`. More seeds than saved
    extend the sweep; any other difference is refused. Config fields absent from the saved
    definition (added to the code since) are not differences."""
    path = out / "sweep.json"
    record = {**meta, **defn}
    if path.exists():
        saved = json.loads(path.read_text())
        diffs = [d for d in definition_diff(saved, defn) if "'<absent>' in sweep.json" not in d]
        grown = bool(diffs) and all(d.startswith("seeds:") for d in diffs) and defn["seeds"] > saved["seeds"]
        if diffs and not grown:
            raise SweepError(f"{path} defines a different sweep; use another --out, or rerun with "
                             f"the saved definition. Differences:\n  " + "\n  ".join(diffs))
        if not grown:
            return
        record = {**saved, **defn, "runs": meta["runs"], "extended": meta["created"]}
    if write:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(path, record)


def _write_json(path: Path, obj) -> None:
    """Whole or not at all (every host of a multi-host job runs the sweep and writes the same)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def vector_groups(exps: list[Experiment], max_params: int = VECTORIZE_MAX_PARAMS) -> list[list[int]]:
    """Indices of `exps` in groups that can train as one vectorized program: equal configs
    except the seed, grpo.kl_coef, grpo.eps_low/eps_high and optim.lr (`vectorized.VECTOR_FIELDS`),
    with a freshly initialized model of at most `max_params` parameters (a Hugging Face model's
    size is not known before loading it: those always run alone). In plan order; a group of one
    is a run alone."""
    from grpo_jax.runner import config_dict
    from grpo_jax.vectorized import VECTOR_FIELDS

    ignored = set(VECTOR_FIELDS) | {"run_dir", "allow_config_change", "log.progress"}
    groups: dict[str, list[int]] = {}
    for i, exp in enumerate(exps):
        small = exp.model.init is not None and exp.model.init.num_params <= max_params
        key = (json.dumps({k: v for k, v in flatten(config_dict(exp)).items() if k not in ignored},
                          sort_keys=True, default=str) if small else f"alone {i}")
        groups.setdefault(key, []).append(i)
    return sorted(groups.values())


def run_sweep(base: Experiment, sweep: Sweep, out: str | Path, *, experiment: str = "",
              set_args: tuple[str, ...] = (), run_fn: Callable | None = None,
              dry_run: bool = False, say: Callable[[str], None] = print, vectorize: bool = False,
              vectorize_max_params: int = VECTORIZE_MAX_PARAMS,
              group_fn: Callable | None = None) -> list[dict]:
    """Run (or resume) the sweep in `out`; returns one record per run: name, run_dir, status
    ("done" already finished, "ran", "failed" with "error", or "planned" in a dry run) and,
    with `vectorize`, "vectorized_with" (the names of the runs trained with it as one program).

    `run_fn(exp, name=...)` runs one experiment (default `runner.run`); `group_fn(exps, names,
    policies=..., say=...)` a vectorized group (default `vectorized.run_group`); a group that
    `group_fn` refuses (`vectorized.Unvectorizable`) runs one by one with `run_fn`."""
    out = Path(out)
    runs = plan_runs(base, sweep, root=out)
    meta = {"experiment": experiment, "set": list(set_args),
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
            "runs": [n for n, _ in runs]}
    check_or_write_definition(out, definition(base, sweep), meta, write=not dry_run)
    if run_fn is None:
        from grpo_jax import runner

        run_fn = runner.run
    n_done = sum((Path(e.run_dir) / "summary.json").exists() for _, e in runs)
    say(f"[sweep] {out}: {len(runs)} runs ({len(runs) // sweep.seeds} settings x {sweep.seeds} "
        f"seeds, hold={sweep.hold}), {n_done} already finished")
    records = [{"name": name, "run_dir": exp.run_dir} for name, exp in runs]
    todo = []
    for i, (name, exp) in enumerate(runs):
        if (Path(exp.run_dir) / "summary.json").exists():
            records[i]["status"] = "done"
        else:
            todo.append(i)
    groups = [[i] for i in todo]
    if vectorize:
        groups = [[todo[j] for j in g]
                  for g in vector_groups([runs[i][1] for i in todo], vectorize_max_params)]
    together = {i: [runs[k][0] for k in g] for g in groups if len(g) > 1 for i in g}
    for i in todo:
        if vectorize:
            records[i]["vectorized_with"] = together.get(i, [])
    if together and not dry_run:
        _record_groups(out / "sweep.json", [[runs[k][0] for k in g] for g in groups if len(g) > 1])
    policies = None
    for g in sorted(groups):
        for i in g:
            name, exp = runs[i]
            state = "restarting unfinished" if Path(exp.run_dir).exists() else "starting"
            what = (f"B={exp.prompts_per_step}, G={exp.grpo.group_size}, N={exp.completions_per_step}"
                    + (f"; vectorized with {len(g) - 1} more" if len(g) > 1 else ""))
            if dry_run:
                records[i]["status"] = "planned"
                say(f"[sweep] would run {i + 1}/{len(runs)} {name} ({state.split()[0]}; {what})")
            else:
                say(f"[sweep] {state} run {i + 1}/{len(runs)}: {name}  ({what})")
                _prepare_run(runs[i], base, sweep, together.get(i, []))
        if dry_run:
            continue
        if len(g) > 1:
            if group_fn is None:
                from grpo_jax.vectorized import run_group as group_fn
            from grpo_jax.vectorized import PolicyCache, Unvectorizable

            if policies is None:  # pretraining shared by the groups of a seed
                policies = PolicyCache()
            try:
                done = group_fn([runs[i][1] for i in g], [runs[i][0] for i in g], policies=policies,
                                say=say)
            except Unvectorizable as e:
                say(f"[sweep] running {', '.join(runs[i][0] for i in g)} one by one: {e}")
                done = None
            except Exception as e:  # the whole group failed
                done = [_failure(runs[i][0], e, traceback.format_exc()) for i in g]
            if done is not None:
                for i, rec in zip(g, done):
                    records[i]["status"] = rec["status"]
                    if rec["status"] == "failed":
                        _failed(records[i], rec["error"], rec["traceback"], say)
                continue
        for i in g:
            name, exp = runs[i]
            try:
                run_fn(exp, name=name)
                records[i]["status"] = "ran"
            except Exception as e:  # one failed run must not stop an overnight sweep
                _failed(records[i], f"{type(e).__name__}: {e}", traceback.format_exc(), say)
    return records


def _prepare_run(run: tuple[str, Experiment], base: Experiment, sweep: Sweep, together: list[str]):
    """The run's directory with its sweep_run.json (and no error left from an earlier attempt)."""
    name, exp = run
    d = Path(exp.run_dir)
    d.mkdir(parents=True, exist_ok=True)
    overrides = {p: _jsonable(v) for p, v in zip(sweep.fields, _values_of(exp, sweep.fields))}
    (d / "sweep_error.txt").unlink(missing_ok=True)
    _write_json(d / "sweep_run.json", {
        "name": name, "sweep_dir": "..", "overrides": overrides, "seed": exp.seed,
        "seed_index": exp.seed - base.seed, "hold": sweep.hold,
        "prompts_per_step": exp.prompts_per_step, "group_size": exp.grpo.group_size,
        "completions_per_step": exp.completions_per_step, "vectorized_with": together})


def _failure(name: str, e: Exception, tb: str) -> dict:
    return {"name": name, "status": "failed", "error": f"{type(e).__name__}: {e}", "traceback": tb}


def _failed(rec: dict, error: str, tb: str, say) -> None:
    rec["status"], rec["error"] = "failed", error
    d = Path(rec["run_dir"])
    d.mkdir(parents=True, exist_ok=True)
    (d / "sweep_error.txt").write_text(tb)
    say(f"[sweep] run {rec['name']} failed: {error} (traceback in {d / 'sweep_error.txt'})")


def _record_groups(path: Path, groups: list[list[str]]) -> None:
    """sweep.json's "vectorized": the groups of runs trained together, the latest attempt of a
    run replacing its earlier group."""
    saved = json.loads(path.read_text())
    names = {n for g in groups for n in g}
    kept = [g for g in saved.get("vectorized", []) if not names & set(g)]
    _write_json(path, {**saved, "vectorized": kept + groups})


def _values_of(exp, paths):
    for p in paths:
        v = exp
        for part in p.split("."):
            v = getattr(v, part)
        yield v


def load_sweep(path: str | Path) -> Sweep | None:
    """The module-level `SWEEP` of an experiment file, if it declares one."""
    spec = importlib.util.spec_from_file_location(f"experiment_{Path(path).stem}_sweep", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sw = getattr(mod, "SWEEP", None)
    if sw is not None and not isinstance(sw, Sweep):
        raise TypeError(f"{path}: SWEEP must be grpo_jax.sweep.Sweep(...), found {type(sw).__name__}")
    return sw


# ----------------------------------------------------------------------------- command line


@dataclasses.dataclass(frozen=True, kw_only=True)
class SweepArgs:
    """Run every combination of --grid values x --seeds of an experiment, each in its own run
    directory under --out; rerunning the same command resumes the sweep."""

    experiment: tyro.conf.Positional[str]  # the experiment file, e.g. experiments/NAME.py
    # FIELD=V1,V2,... e.g. grpo.kl_coef=0,0.01 (default: the experiment file's SWEEP grid)
    grid: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    seeds: int | None = None  # runs per setting, seeds base+0 .. base+n-1 (default: SWEEP's, or 1)
    # what stays fixed when G varies: prompts (B) or completions (B x G); default: SWEEP's, or prompts
    hold: Hold | None = None
    out: Path | None = None  # the sweep directory (default: runs/<experiment>-sweep)
    # FIELD=VALUE applied to the base experiment before the grid
    set: Annotated[tuple[str, ...], tyro.conf.UseAppendAction] = ()
    dry_run: bool = False  # print what would run, run nothing
    compare: bool = True  # write compare.png / compare.md into the sweep directory at the end
    # reuse compiled programs across the runs (JAX's persistent compilation cache in
    # OUT/.jax_cache, unless one is configured already): runs with the same shapes skip compiling
    compile_cache: bool = True
    # train runs that differ only in seed, grpo.kl_coef, grpo.eps_low/eps_high and optim.lr as
    # one batched (vmapped) program when the model has at most --vectorize-max-params parameters;
    # --no-vectorize runs them one by one
    vectorize: bool = True
    vectorize_max_params: int = VECTORIZE_MAX_PARAMS


def use_compile_cache(path: Path) -> None:
    """Point JAX's persistent compilation cache at `path` unless a cache is configured already.
    It only takes effect before the process's first compilation (as in a fresh `grpo-jax sweep`)."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # the tiny models' programs compile in well under the default 1 s threshold
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def sweep_main(argv: list[str]) -> list[dict]:
    """`grpo-jax sweep EXPERIMENT.py [--grid FIELD=V1,V2 ...] [--seeds N] [--hold H] [--out DIR]
    [--set FIELD=VALUE ...] [--dry-run] [--no-vectorize]`."""
    from grpo_jax.runner import load_experiment

    args = tyro.cli(SweepArgs, args=argv, prog="grpo-jax sweep")
    try:
        base = load_experiment(args.experiment)
        declared = load_sweep(args.experiment)
        if args.set:
            base = apply_overrides(base, dict(parse_assignment(s, many=False) for s in args.set))
        if args.grid:  # the command line's grid replaces the file's SWEEP entirely
            declared = Sweep(grid=tuple(parse_assignment(g, many=True) for g in args.grid))
        declared = declared or Sweep()
        sweep = Sweep(grid=declared.grid,
                      seeds=declared.seeds if args.seeds is None else args.seeds,
                      hold=args.hold or declared.hold)
        out = args.out or Path("runs") / f"{Path(args.experiment).stem}-sweep"
        if args.compile_cache and not args.dry_run:
            use_compile_cache(out / ".jax_cache")
        records = run_sweep(base, sweep, out, experiment=str(args.experiment), set_args=args.set,
                            dry_run=args.dry_run, vectorize=args.vectorize,
                            vectorize_max_params=args.vectorize_max_params)
    except (ValueError, TypeError, FileNotFoundError) as e:  # SweepError and config errors
        print(f"grpo-jax sweep: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    failed = [r for r in records if r["status"] == "failed"]
    counts = {s: sum(r["status"] == s for r in records) for s in ("done", "ran", "failed", "planned")}
    print(f"[sweep] {out}: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    if args.compare and not args.dry_run and not failed:
        from grpo_jax.compare import compare

        compare([out], out=out)
        print(f"[sweep] wrote {out / 'compare.md'} and compare.png (grpo-jax compare {out})")
    if failed:
        print("[sweep] failed runs (rerun the same command to retry them):\n  "
              + "\n  ".join(f"{r['name']}: {r['error']}" for r in failed), file=sys.stderr)
        raise SystemExit(1)
    return records
