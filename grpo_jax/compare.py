"""Compare runs: curves with seed bands, and a table of held-out results per setting.

    grpo-jax compare SWEEP_DIR_OR_RUN_DIRS... [--x steps|samples|tokens|wall] [--out DIR]
        [--threshold 0.3] [--metrics reward,accuracy,kl,response_length,entropy,clip_frac]

Runs are grouped by setting: their config minus seed, run_dir, log and checkpoint. A setting is
labelled by the swept fields (sweep.json), then by any other field that differs among settings.
Writes compare.png, compare.md (deterministic: same inputs, same bytes) and compare.json.

Table, per setting (all held-out numbers come from eval.jsonl):
- final pass@1: the last evaluation's pass@1, mean +- sample std (ddof = 1) over seeds;
- steps to threshold: the first evaluated step at which the seed-mean held-out pass@1 reaches
  the threshold ("never" if none does); held-out rather than training accuracy because training
  accuracy is measured on temperature-1 rollouts of each step's own prompts;
- AUC: trapezoid area under each seed's held-out pass@1 over steps, divided by the step range;
- final format rate: the last evaluation's held-out format rate.

x axes: steps; samples = cumulative completions sampled (a per-step metric if the trainer logs
one, else prompts_per_step x G, or ceil(B x dynamic_oversample) x G with DAPO dynamic sampling);
tokens = cumulative generated tokens (a tokens metric, else rollout_tokens_per_s x rollout_s, which
counts every sampled completion, else response_length x completions); wall = cumulative step_s
(training steps only: no evaluation or pretraining). Seeds are averaged at equal steps; with
x != steps the curve's x is the seed-mean x at that step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Literal

import numpy as np
import tyro

from grpo_jax.sweep import flatten, short_names

XAxis = Literal["steps", "samples", "tokens", "wall"]
Band = Literal["minmax", "std"]
DEFAULT_METRICS = ("reward", "accuracy", "kl", "response_length", "entropy", "clip_frac")
IGNORED = ("seed", "run_dir", "log", "checkpoint", "allow_config_change")  # not part of a setting
SAMPLE_KEYS = ("completions_sampled", "samples_generated", "rollout_completions")
TOKEN_KEYS = ("tokens_generated", "rollout_tokens")
X_LABELS = {"steps": "step", "samples": "completions sampled", "tokens": "tokens generated",
            "wall": "training time (s, cumulative step_s)"}


@dataclasses.dataclass
class Run:
    dir: Path
    config: dict
    rows: list[dict]  # metrics.jsonl, one row per step
    evals: list[dict]  # eval.jsonl, one row per evaluated step
    finished: bool  # summary.json present

    @property
    def name(self) -> str:
        return self.dir.name


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a jsonl log sorted by step, the last row of a step winning (a restarted run
    appends again); a torn last line (a run killed while writing) is ignored."""
    if not path.exists():
        return []
    by_step = {}
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue
            raise ValueError(f"{path}:{i + 1}: not JSON: {line[:80]!r}") from None
        by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def load_run(d: Path) -> Run:
    return Run(dir=d, config=json.loads((d / "config.json").read_text()),
               rows=read_jsonl(d / "metrics.jsonl"), evals=read_jsonl(d / "eval.jsonl"),
               finished=(d / "summary.json").exists())


def find_runs(paths) -> tuple[list[Run], list[dict]]:
    """Runs under each path (a run directory, or a directory of run directories such as a sweep)
    and the sweep definitions (sweep.json) of those directories or of the runs' parents."""
    runs, sweep_files = [], []
    for p in map(Path, paths):
        if (p / "config.json").exists():
            runs.append(load_run(p))
            sweep_files.append(p.parent / "sweep.json")
            continue
        if not p.is_dir():
            raise FileNotFoundError(f"{p}: no such run or sweep directory")
        found = [load_run(d) for d in sorted(p.iterdir()) if (d / "config.json").exists()]
        if not found:
            raise FileNotFoundError(f"{p}: neither a run directory (config.json) nor a directory "
                                    f"of runs")
        runs += found
        sweep_files.append(p / "sweep.json")
    unique = {r.dir.resolve(): r for r in runs}
    sweeps = {f.resolve(): json.loads(f.read_text()) for f in sweep_files if f.exists()}
    # sorted, so that the order of the paths given does not change the output
    return (sorted(unique.values(), key=lambda r: str(r.dir.resolve())),
            sorted(sweeps.values(), key=lambda sw: json.dumps(sw, sort_keys=True)))


# ----------------------------------------------------------------------------- x axes


def completions_sampled(cfg: dict) -> int:
    """Completions the rollout samples per step, by the config (DAPO dynamic sampling draws
    ceil(B x oversample) prompts)."""
    b, g = cfg["prompts_per_step"], cfg["grpo"]["group_size"]
    if cfg["grpo"].get("zero_std") == "dynamic":
        b = math.ceil(b * cfg["grpo"]["dynamic_oversample"])
    return b * g


def _step_amount(row: dict, x: str, cfg: dict) -> float:
    if x == "samples":
        return next((row[k] for k in SAMPLE_KEYS if k in row), completions_sampled(cfg))
    if x == "tokens":
        if (k := next((k for k in TOKEN_KEYS if k in row), None)) is not None:
            return row[k]
        if "rollout_tokens_per_s" in row and "rollout_s" in row:
            return row["rollout_tokens_per_s"] * row["rollout_s"]
        if "response_length" in row:
            n = next((row[k] for k in SAMPLE_KEYS if k in row), None)
            return row["response_length"] * (n or cfg["prompts_per_step"] * cfg["grpo"]["group_size"])
        raise ValueError("--x tokens needs a tokens or response_length metric in metrics.jsonl")
    if x == "wall":
        if "step_s" not in row:
            raise ValueError("--x wall needs step_s in metrics.jsonl")
        return row["step_s"]
    raise ValueError(f"--x: got {x!r}, allowed values are {list(X_LABELS)}")


def x_of_step(run: Run, x: str):
    """A function step -> x for this run (x = 0 at step 0). Rows logged every k steps stand for
    their k steps; between rows x is interpolated linearly."""
    if x == "steps":
        return lambda s: np.asarray(s, float)
    steps, cum, prev, total = [0], [0.0], 0, 0.0
    for r in run.rows:
        total += _step_amount(r, x, run.config) * (r["step"] - prev)
        prev = r["step"]
        steps.append(prev)
        cum.append(total)
    return lambda s: np.interp(np.asarray(s, float), steps, cum)


# ----------------------------------------------------------------------------- settings


def _get(cfg: dict, path: str):
    v = cfg
    for part in path.split("."):
        if not isinstance(v, dict) or part not in v:
            return None
        v = v[part]
    return v


def setting_of(cfg: dict) -> str:
    flat = {k: v for k, v in flatten(cfg).items() if k.split(".")[0] not in IGNORED}
    return json.dumps(sorted(flat.items()), sort_keys=True)


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return json.dumps(v)
    if isinstance(v, (int, float, str)):
        return str(v)
    return json.dumps(v, separators=(",", ":"), sort_keys=True)


def _sort_key(v):
    if v is None:
        return (0, 0.0, "")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (1, float(v), "")
    return (2, 0.0, json.dumps(v, sort_keys=True))


def group_settings(runs: list[Run], sweeps: list[dict]) -> list[dict]:
    """[{label, fields, runs}] sorted by the label fields' values. Label fields: the swept ones,
    then any other field that differs among the settings."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(setting_of(r.config), []).append(r)
    fields = list(dict.fromkeys(p for sw in sweeps for p, _ in sw.get("grid", [])))
    flats = [dict(json.loads(k)) for k in groups]
    for k in flats[0] if flats else ():
        if k not in fields and any(f.get(k) != flats[0].get(k) for f in flats):
            fields.append(k)
    for k in sorted({k for f in flats for k in f} - set(flats[0] if flats else ())):
        if k not in fields:
            fields.append(k)
    shorts = short_names(fields)
    settings = []
    for members in groups.values():
        members = sorted(members, key=lambda r: (r.config.get("seed", 0), r.name))
        values = {f: _get(members[0].config, f) for f in fields}
        label = ", ".join(f"{s}={_fmt(values[f])}" for s, f in zip(shorts, fields))
        label = label or (members[0].name if len(members) == 1 else "all runs")
        settings.append({"label": label, "fields": values, "runs": members})
    settings.sort(key=lambda s: (tuple(_sort_key(s["fields"][f]) for f in fields), s["label"]))
    return settings


# ----------------------------------------------------------------------------- numbers


def _mean_std(values: list[float]) -> dict:
    a = np.asarray(values, float)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else None,
            "n": len(a), "values": [float(v) for v in a]}


def auc(evals: list[dict]) -> float | None:
    """Trapezoid area under pass@1 over steps, divided by the step range (None for < 2 evals)."""
    if len(evals) < 2:
        return None
    s = np.asarray([e["step"] for e in evals], float)
    p = np.asarray([e["pass_at_1"] for e in evals], float)
    return float(np.sum((p[1:] + p[:-1]) / 2 * np.diff(s)) / (s[-1] - s[0]))


def mean_curve(runs: list[Run], key: str, source: str = "rows", smooth: float = 0.0):
    """(steps, y values [runs, steps]) at the steps every run has, after optional EMA smoothing."""
    per_run = []
    for r in runs:
        pts = [(row["step"], row[key]) for row in getattr(r, source)
               if isinstance(row.get(key), (int, float))]
        if smooth and pts:
            ema, out = pts[0][1], []
            for s, v in pts:
                ema = smooth * ema + (1 - smooth) * v
                out.append((s, ema))
            pts = out
        per_run.append(dict(pts))
    common = sorted(set.intersection(*(set(d) for d in per_run))) if per_run else []
    return np.asarray(common, float), np.asarray([[d[s] for s in common] for d in per_run], float)


def setting_numbers(setting: dict, threshold: float, x: str) -> dict:
    runs = [r for r in setting["runs"] if r.evals]
    out = {"label": setting["label"], "fields": setting["fields"], "seeds": len(setting["runs"]),
           "runs": [], "final_pass_at_1": None, "auc_pass_at_1": None, "final_format_rate": None,
           "steps_to_threshold": None, f"{x}_to_threshold": None}
    for r in setting["runs"]:
        out["runs"].append({"name": r.name, "seed": r.config.get("seed"),
                            "final_pass_at_1": r.evals[-1]["pass_at_1"] if r.evals else None,
                            "final_step": r.evals[-1]["step"] if r.evals else None,
                            "auc_pass_at_1": auc(r.evals),
                            "final_format_rate": r.evals[-1].get("format_rate") if r.evals else None})
    if not runs:
        return out
    out["final_pass_at_1"] = _mean_std([r.evals[-1]["pass_at_1"] for r in runs])
    if all(r.evals[-1].get("format_rate") is not None for r in runs):
        out["final_format_rate"] = _mean_std([r.evals[-1]["format_rate"] for r in runs])
    aucs = [auc(r.evals) for r in runs]
    if all(a is not None for a in aucs):
        out["auc_pass_at_1"] = _mean_std(aucs)
    steps, ys = mean_curve(runs, "pass_at_1", source="evals")
    hit = np.flatnonzero(ys.mean(0) >= threshold) if len(steps) else []
    if len(hit):
        s = float(steps[hit[0]])
        out["steps_to_threshold"] = int(s) if s.is_integer() else s
        if x != "steps":
            out[f"{x}_to_threshold"] = float(np.mean([x_of_step(r, x)(s) for r in runs]))
    else:
        out["steps_to_threshold"] = "never"
        if x != "steps":
            out[f"{x}_to_threshold"] = "never"
    return out


def _cell(ms: dict | None) -> str:
    if ms is None:
        return "n/a"
    return f"{ms['mean']:.3f}" if ms["std"] is None else f"{ms['mean']:.3f} ± {ms['std']:.3f}"


def _num(v) -> str:
    if isinstance(v, float) and not v.is_integer():
        return f"{v:,.1f}"
    return f"{int(v):,}" if isinstance(v, (int, float)) else str(v)


def markdown(result: dict) -> str:
    t, x = result["threshold"], result["x"]
    lines = ["# Comparison"]
    for sw in result["sweeps"]:
        grid = "; ".join(f"{p} in {v}" for p, v in sw["grid"]) or "(seeds only)"
        lines += ["", f"Sweep of `{sw['experiment']}`: {grid}; {sw['seeds']} seed(s); "
                  f"hold = {sw['hold']}."]
    lines += ["", f"Curves (compare.png): x = {X_LABELS[x]}; mean over seeds, band = "
              f"{'min-max over seeds' if result['band'] == 'minmax' else 'mean ± sample std over seeds'}"
              + (f"; EMA smoothing {result['smooth']}" if result["smooth"] else "") + ".",
              f"Held-out numbers from eval.jsonl. Final: last evaluation, mean ± sample std "
              f"(ddof = 1) over seeds. Steps to pass@1 ≥ {t}: first evaluated step at which the "
              f"seed-mean held-out pass@1 reaches {t}. AUC: area under held-out pass@1 over steps "
              f"(trapezoid) / step range. Format rate: held-out, last evaluation.", ""]
    head = ["setting", "seeds", "final pass@1", f"steps to pass@1 ≥ {t}"]
    if x != "steps":
        head.append(f"{X_LABELS[x]} to pass@1 ≥ {t}")
    head += ["AUC pass@1", "final format rate"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in result["settings"]:
        row = [s["label"], str(s["seeds"]), _cell(s["final_pass_at_1"]), _num(s["steps_to_threshold"])]
        if x != "steps":
            row.append(_num(s[f"{x}_to_threshold"]))
        row += [_cell(s["auc_pass_at_1"]), _cell(s["final_format_rate"])]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Runs:", ""]
    for s in result["settings"]:
        lines.append(f"- {s['label']}: " + ", ".join(
            f"{r['name']} (pass@1 {r['final_pass_at_1']:.3f} at step {r['final_step']})"
            if r["final_pass_at_1"] is not None else f"{r['name']} (no evaluation)" for r in s["runs"]))
    if result["unfinished"]:
        lines += ["", "Left out, unfinished (no summary.json): " + ", ".join(result["unfinished"])]
    if result["missing_metrics"]:
        lines += ["", "Metrics not in any metrics.jsonl (no panel): " + ", ".join(result["missing_metrics"])]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- plot


def resolve_metrics(runs: list[Run], wanted) -> tuple[list[str], list[str]]:
    """Metric keys to plot: each wanted name if logged, else the logged keys that start with it
    (clip_frac -> clip_frac_low, clip_frac_high); and the names found nowhere."""
    keys = sorted({k for r in runs for row in r.rows for k in row})
    found, missing = [], []
    for m in wanted:
        hits = [m] if m in keys else [k for k in keys if k.startswith(m)]
        found += [h for h in hits if h not in found]
        if not hits:
            missing.append(m)
    return found, missing


def plot(settings: list[dict], metrics: list[str], x: str, band: str, smooth: float, path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from grpo_jax.plots import MAIN_CURVES

    titles = dict(MAIN_CURVES)
    panels = [(m, "rows") for m in metrics] + [("pass_at_1", "evals")]
    cols = min(4, len(panels))
    nrows = -(-len(panels) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows + 0.4 * (len(settings) // 3 + 1)),
                             squeeze=False)
    cmap = plt.get_cmap("tab10" if len(settings) <= 10 else "tab20")
    for ax, (key, source) in zip(axes.flat, panels):
        for i, s in enumerate(settings):
            runs = [r for r in s["runs"] if getattr(r, source)]
            if not runs:
                continue
            steps, ys = mean_curve(runs, key, source, smooth if source == "rows" else 0.0)
            if not len(steps):
                continue
            xs = np.mean([x_of_step(r, x)(steps) for r in runs], axis=0)
            mean = ys.mean(0)
            if band == "minmax":
                lo, hi = ys.min(0), ys.max(0)
            else:
                sd = ys.std(0, ddof=1) if len(runs) > 1 else np.zeros_like(mean)
                lo, hi = mean - sd, mean + sd
            style = "o-" if source == "evals" else "-"
            ax.plot(xs, mean, style, c=cmap(i % cmap.N), lw=1.3, ms=3,
                    label=f"{s['label']} (n={len(runs)})")
            if len(runs) > 1:
                ax.fill_between(xs, lo, hi, color=cmap(i % cmap.N), alpha=0.18, lw=0)
        ax.set_title("held-out pass@1" if source == "evals" else titles.get(key, key), fontsize=10)
        ax.set_xlabel(X_LABELS[x], fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles, labels = axes.flat[len(panels) - 1].get_legend_handles_labels()
    what = "min-max" if band == "minmax" else "±1 sample std"
    fig.legend(handles, labels, loc="lower center", ncol=min(3, max(1, len(labels))), fontsize=8,
               title=f"mean over seeds, band = {what} over seeds", title_fontsize=8)
    fig.tight_layout(rect=(0, 0.06 + 0.03 * (len(labels) // 3), 1, 1))
    fig.savefig(path, dpi=90, metadata={"Software": None})
    plt.close(fig)


# ----------------------------------------------------------------------------- entry points


def compare(paths, *, x: XAxis = "steps", out: str | Path | None = None, threshold: float = 0.3,
            metrics=DEFAULT_METRICS, smooth: float = 0.0, band: Band = "minmax",
            say=print) -> dict:
    """Write compare.png, compare.md and compare.json into `out` (default: the sweep directory,
    or the common parent of the run directories); returns the compare.json content."""
    if x not in X_LABELS:
        raise ValueError(f"x: got {x!r}, allowed values are {list(X_LABELS)}")
    if band not in ("minmax", "std"):
        raise ValueError(f"band: got {band!r}, allowed values are ['minmax', 'std']")
    if not 0 <= smooth < 1:
        raise ValueError(f"smooth: the EMA weight must be in [0, 1), got {smooth}")
    paths = [Path(p) for p in paths]
    runs, sweeps = find_runs(paths)
    unfinished = sorted(r.name for r in runs if not r.finished)
    runs = [r for r in runs if r.finished]
    if not runs:
        raise ValueError(f"no finished run (summary.json) under {', '.join(map(str, paths))}")
    if out is None:
        out = paths[0] if len(paths) == 1 and not (paths[0] / "config.json").exists() else \
            Path(os.path.commonpath([str(r.dir.resolve().parent) for r in runs]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = group_settings(runs, sweeps)
    keys, missing = resolve_metrics(runs, metrics)
    result = {
        "x": x, "threshold": threshold, "threshold_on": "held-out pass@1 (eval.jsonl)",
        "band": band, "smooth": smooth, "metrics": keys, "missing_metrics": missing,
        "unfinished": unfinished,
        "sweeps": [{"experiment": sw.get("experiment", ""), "grid": sw.get("grid", []),
                    "seeds": sw.get("seeds"), "hold": sw.get("hold")} for sw in sweeps],
        "settings": [setting_numbers(s, threshold, x) for s in settings],
    }
    (out / "compare.md").write_text(markdown(result))
    (out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(settings, keys, x, band, smooth, out / "compare.png")
    say(f"[compare] {len(runs)} runs in {len(settings)} settings; wrote {out / 'compare.md'}, "
        f"compare.png, compare.json")
    return result


@dataclasses.dataclass(frozen=True, kw_only=True)
class CompareArgs:
    """Compare runs grouped by setting: curves with seed bands (compare.png) and a table of
    held-out pass@1 (compare.md, compare.json)."""

    paths: tyro.conf.Positional[tuple[str, ...]]  # sweep directories and/or run directories
    x: XAxis = "steps"  # x axis of the curves
    out: Path | None = None  # output directory (default: the sweep directory)
    threshold: float = 0.3  # held-out pass@1 threshold for "steps to threshold"
    metrics: str = ",".join(DEFAULT_METRICS)  # metrics.jsonl keys to plot (prefixes allowed)
    smooth: float = 0.0  # EMA weight for the training curves (0 = off, e.g. 0.6 = light)
    band: Band = "minmax"  # seed band: min-max or mean +- sample std


def compare_main(argv: list[str]) -> dict:
    """`grpo-jax compare SWEEP_DIR_OR_RUN_DIRS... [--x ...] [--out DIR] [--threshold T]`."""
    args = tyro.cli(CompareArgs, args=argv, prog="grpo-jax compare")
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip())
    try:
        return compare(args.paths, x=args.x, out=args.out, threshold=args.threshold,
                       metrics=metrics, smooth=args.smooth, band=args.band)
    except (ValueError, FileNotFoundError) as e:
        import sys

        print(f"grpo-jax compare: {e}", file=sys.stderr)
        raise SystemExit(2) from None
