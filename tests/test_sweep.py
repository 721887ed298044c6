"""Sweeps (grid parsing, planning, resume, refusal) and the comparison of runs."""

import dataclasses
import json
from pathlib import Path

import pytest

from grpo_jax import runner
from grpo_jax.compare import compare, compare_main
from grpo_jax.runner import config_dict, load_experiment
from grpo_jax.config import ModelSource
from grpo_jax.sweep import (Sweep, SweepError, apply_overrides, load_sweep, parse_assignment,
                            plan_runs, run_sweep, sweep_main, vector_groups)
from grpo_jax.vectorized import Unvectorizable

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "experiments" / "tiny_r1_zero.py"


@pytest.fixture(scope="module")
def base():
    return load_experiment(TINY)  # B = 16, G = 8, seed 0


# ----------------------------------------------------------------------------- parsing


def test_grid_values_are_parsed_by_field_type():
    assert parse_assignment("grpo.kl_coef=0,0.01,0.04", many=True) == ("grpo.kl_coef", (0.0, 0.01, 0.04))
    path, values = parse_assignment("grpo.group_size=4,8", many=True)
    assert values == (4, 8) and all(type(v) is int for v in values)
    assert type(parse_assignment("grpo.kl_coef=0", many=True)[1][0]) is float
    assert parse_assignment("grpo.mask_truncated=true,no", many=True)[1] == (True, False)
    assert parse_assignment("grpo.aggregation=token_mean", many=True)[1] == ("token_mean",)
    assert parse_assignment("sampler.stop_ids=(1,2),(3,)", many=True)[1] == ((1, 2), (3,))
    assert parse_assignment("pretrain=none", many=False) == ("pretrain", None)
    assert parse_assignment("model.init.scan_layers=None,true", many=True)[1] == (None, True)
    assert parse_assignment("steps=5", many=False) == ("steps", 5)


@pytest.mark.parametrize("text, message", [
    ("grpo.kl_coeff=0,0.01", "did you mean 'grpo.kl_coef'"),
    ("kl_coef=0", "did you mean 'grpo.kl_coef'"),
    ("beta=0", "did you mean 'grpo.kl_coef'"),
    ("sampler.temprature=1", "did you mean 'sampler.temperature'"),
    ("grpo.group_size=4,eight", "grpo.group_size: expected an int, got 'eight'"),
    ("grpo.group_size=4.5", "expected an int"),
    ("grpo.kl_coef=small", "grpo.kl_coef: expected a float"),
    ("grpo.kl_estimator=k3,k4", "'k4' is not one of ['k1', 'k2', 'k3']"),
    ("grpo.mask_truncated=maybe", "expected a bool"),
    ("grpo=1", "grpo is a section (GRPOConfig)"),
    ("steps.x=1", "unknown field 'steps.x'"),
    ("grpo.kl_coef", "expected FIELD=VALUE"),
    ("grpo.kl_coef=", "no values for grpo.kl_coef"),
])
def test_grid_errors_name_the_field(text, message):
    with pytest.raises(SweepError) as e:
        parse_assignment(text, many=True)
    assert message in str(e.value)


def test_declared_sweep_is_validated():
    sw = Sweep(grid=(("grpo.kl_coef", (0, 0.01)), ("grpo.group_size", ("4", 8))))
    assert sw.grid == (("grpo.kl_coef", (0.0, 0.01)), ("grpo.group_size", (4, 8)))
    assert type(sw.grid[0][1][0]) is float
    kl = "grpo.kl_coef"
    for bad, msg in [(dict(grid=((kl, (0.0, 0)),)), "repeats a value"),
                     (dict(grid=(("seed", (0, 1)),)), "--seeds"),
                     (dict(grid=((kl, (0.0,)), (kl, (1.0,)))), "appears twice"),
                     (dict(grid=(("prompts_per_step", (4, 8)),), hold="completions"), "hold='prompts'"),
                     (dict(grid=(("grpo.klcoef", (0.0,)),)), "did you mean 'grpo.kl_coef'"),
                     (dict(seeds=0), "seeds: must be >= 1"),
                     (dict(hold="tokens"), "hold: got 'tokens'")]:
        with pytest.raises(SweepError) as e:
            Sweep(**bad)
        assert msg in str(e.value), (bad, str(e.value))


def test_apply_overrides_replaces_nested_frozen_configs(base):
    exp = apply_overrides(base, {"grpo.kl_coef": 0.0, "grpo.group_size": 4, "model.init.num_layers": 1,
                                 "pretrain.steps": 7, "seed": 3})
    assert (exp.grpo.kl_coef, exp.grpo.group_size, exp.model.init.num_layers, exp.pretrain.steps,
            exp.seed) == (0.0, 4, 1, 7, 3)
    assert exp.grpo.eps_low == base.grpo.eps_low and base.grpo.kl_coef == 0.04  # base untouched
    no_pretrain = dataclasses.replace(base, pretrain=None)
    with pytest.raises(SweepError, match="pretrain is None in the base config"):
        apply_overrides(no_pretrain, {"pretrain.steps": 5})
    with pytest.raises(ValueError, match="grpo.group_size: must be >= 2"):
        apply_overrides(base, {"grpo.group_size": 1})


# ----------------------------------------------------------------------------- planning


def test_plan_runs_names_seeds_and_order(base, tmp_path):
    sw = Sweep(grid=(("grpo.kl_coef", (0.0, 0.01)), ("grpo.group_size", (4, 8))), seeds=2)
    runs = plan_runs(dataclasses.replace(base, seed=5), sw, root=tmp_path)
    names = [n for n, _ in runs]
    # seed-major: the whole grid with the first seed, then again with the next
    assert names == ["kl_coef=0.0,group_size=4,seed=5", "kl_coef=0.0,group_size=8,seed=5",
                     "kl_coef=0.01,group_size=4,seed=5", "kl_coef=0.01,group_size=8,seed=5",
                     "kl_coef=0.0,group_size=4,seed=6", "kl_coef=0.0,group_size=8,seed=6",
                     "kl_coef=0.01,group_size=4,seed=6", "kl_coef=0.01,group_size=8,seed=6"]
    n, exp = runs[6]
    assert (exp.grpo.kl_coef, exp.grpo.group_size, exp.seed) == (0.01, 4, 6)
    assert exp.prompts_per_step == 16  # hold="prompts": B is the base's for every G
    assert exp.run_dir == str(tmp_path / n)
    assert plan_runs(base, Sweep(seeds=2))[1][0] == "seed=1"
    # an ambiguous short name keeps its section
    both = Sweep(grid=(("model.remat", (False, True)), ("model.init.remat", (False,))))
    assert plan_runs(base, both)[1][0] == "model.remat=true,model.init.remat=false,seed=0"


def test_hold_completions_keeps_b_times_g(base):
    sw = Sweep(grid=(("grpo.group_size", (4, 8, 16, 32)),), hold="completions")
    got = [(e.grpo.group_size, e.prompts_per_step, e.completions_per_step) for _, e in plan_runs(base, sw)]
    assert got == [(4, 32, 128), (8, 16, 128), (16, 8, 128), (32, 4, 128)]
    with pytest.raises(SweepError, match="16 x 8 = 128 completions per step, which G = 12 does not divide"):
        plan_runs(base, Sweep(grid=(("grpo.group_size", (4, 12)),), hold="completions"))
    four_mb = dataclasses.replace(base, grpo=dataclasses.replace(base.grpo, minibatches=4))
    with pytest.raises(SweepError) as e:
        plan_runs(four_mb, Sweep(grid=(("grpo.group_size", (8, 64)),), hold="completions"))
    assert "group_size=64" in str(e.value) and "prompts_per_step = 128 // G=64 = 2" in str(e.value)
    assert "grpo.minibatches" in str(e.value)


def test_ablation_experiment_declares_its_sweep():
    path = ROOT / "experiments" / "ablate_beta_group_tiny.py"
    exp, sw = load_experiment(path), load_sweep(path)
    runs = plan_runs(exp, sw)
    assert len(runs) == 12 and sw.hold == "completions"
    assert {e.completions_per_step for _, e in runs} == {exp.completions_per_step}
    assert {(e.grpo.kl_coef, e.grpo.group_size) for _, e in runs} == {
        (b, g) for b in (0.0, 0.01, 0.04) for g in (4, 8)}
    assert load_sweep(TINY) is None


# ----------------------------------------------------------------------------- resume, refusal


def fake_run(calls):
    """A stand-in for runner.run: records the call and writes what a finished run leaves."""

    def run(exp, name="run"):
        calls.append(name)
        d = Path(exp.run_dir)
        (d / "config.json").write_text(json.dumps(config_dict(exp)))
        (d / "summary.json").write_text("{}")
        if "fail" in exp.data.task_args:
            raise RuntimeError("boom")
        return {}

    return run


def test_resume_skips_finished_and_reruns_unfinished(base, tmp_path):
    sw = Sweep(grid=(("grpo.kl_coef", (0.0, 0.04)),), seeds=2)
    calls = []
    recs = run_sweep(base, sw, tmp_path, run_fn=fake_run(calls), say=lambda m: None)
    assert [r["status"] for r in recs] == ["ran"] * 4 and len(calls) == 4
    meta = json.loads((tmp_path / "kl_coef=0.04,seed=1" / "sweep_run.json").read_text())
    assert meta["overrides"] == {"grpo.kl_coef": 0.04} and meta["seed"] == 1 and meta["hold"] == "prompts"
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert saved["grid"] == [["grpo.kl_coef", [0.0, 0.04]]] and saved["seeds"] == 2
    assert saved["base"]["grpo"]["group_size"] == 8 and "created" in saved
    calls.clear()
    recs = run_sweep(base, sw, tmp_path, run_fn=fake_run(calls), say=lambda m: None)
    assert calls == [] and [r["status"] for r in recs] == ["done"] * 4
    (tmp_path / "kl_coef=0.0,seed=1" / "summary.json").unlink()  # an interrupted run
    run_sweep(base, sw, tmp_path, run_fn=fake_run(calls), say=lambda m: None)
    assert calls == ["kl_coef=0.0,seed=1"]
    calls.clear()  # more seeds extend the sweep: only the new runs run
    run_sweep(base, dataclasses.replace(sw, seeds=3), tmp_path, run_fn=fake_run(calls), say=lambda m: None)
    assert calls == ["kl_coef=0.0,seed=2", "kl_coef=0.04,seed=2"]
    assert json.loads((tmp_path / "sweep.json").read_text())["seeds"] == 3


def test_a_failed_run_does_not_stop_the_sweep(base, tmp_path):
    calls = []
    sw = Sweep(grid=(("data.task_args", ('{"fail": 1}', "{}")),))
    recs = run_sweep(base, sw, tmp_path, run_fn=fake_run(calls), say=lambda m: None)
    assert [r["status"] for r in recs] == ["failed", "ran"] and len(calls) == 2
    assert "RuntimeError: boom" in recs[0]["error"]
    assert "boom" in (Path(recs[0]["run_dir"]) / "sweep_error.txt").read_text()


def fake_group(calls, *, fail=(), refuse=False):
    """A stand-in for vectorized.run_group: records the group and finishes its runs."""

    def group(exps, names, *, policies, say):
        calls.append(list(names))
        if refuse:
            raise Unvectorizable("checkpoints at different steps")
        recs = []
        for exp, name in zip(exps, names):
            (Path(exp.run_dir) / "summary.json").write_text("{}")
            recs.append({"name": name, "run_dir": exp.run_dir, "status": "ran"} if name not in fail
                        else {"name": name, "status": "failed", "error": "NumericFault: nan",
                              "traceback": "Traceback: NumericFault"})
        return recs

    return group


def test_vector_groups_hold_runs_that_differ_in_scalars_only(base):
    sw = Sweep(grid=(("grpo.kl_coef", (0.0, 0.04)), ("grpo.group_size", (4, 8)),
                     ("optim.lr", (1e-3, 1e-4))), seeds=2)
    runs = plan_runs(base, sw)
    groups = vector_groups([e for _, e in runs])
    assert [sorted({runs[i][1].grpo.group_size for i in g}) for g in groups] == [[4], [8]]
    assert [len(g) for g in groups] == [8, 8]  # 2 betas x 2 lrs x 2 seeds each
    assert vector_groups([e for _, e in runs], max_params=1000) == [[i] for i in range(16)]
    hf = dataclasses.replace(base, model=ModelSource(path="Qwen/Qwen2.5-0.5B"), pretrain=None)
    assert vector_groups([hf, dataclasses.replace(hf, seed=1)]) == [[0], [1]]  # size unknown: alone


def test_vectorized_sweep_runs_groups_and_records_them(base, tmp_path):
    sw = Sweep(grid=(("grpo.kl_coef", (0.0, 0.04)), ("grpo.group_size", (4, 8))), seeds=2)
    calls, groups = [], []
    say = lambda m: None
    recs = run_sweep(base, sw, tmp_path, run_fn=fake_run(calls), group_fn=fake_group(groups),
                     vectorize=True, say=say)
    g4 = ["kl_coef=0.0,group_size=4,seed=0", "kl_coef=0.04,group_size=4,seed=0",
          "kl_coef=0.0,group_size=4,seed=1", "kl_coef=0.04,group_size=4,seed=1"]
    g8 = [n.replace("group_size=4", "group_size=8") for n in g4]
    assert calls == [] and groups == [g4, g8]
    assert [r["status"] for r in recs] == ["ran"] * 8
    assert next(r for r in recs if r["name"] == g8[1])["vectorized_with"] == g8
    assert json.loads((tmp_path / "sweep.json").read_text())["vectorized"] == [g4, g8]
    assert json.loads((tmp_path / g4[2] / "sweep_run.json").read_text())["vectorized_with"] == g4
    # resume: finished runs are skipped; a lone unfinished run runs alone
    (tmp_path / g8[3] / "summary.json").unlink()
    groups.clear()
    recs = run_sweep(base, sw, tmp_path, run_fn=fake_run(calls), group_fn=fake_group(groups),
                     vectorize=True, say=say)
    assert groups == [] and calls == [g8[3]]
    assert [r["status"] for r in recs].count("done") == 7
    assert json.loads((tmp_path / "sweep.json").read_text())["vectorized"] == [g4, g8]


def test_a_refused_group_runs_one_by_one_and_a_failed_run_is_recorded(base, tmp_path):
    sw = Sweep(grid=(("grpo.kl_coef", (0.0, 0.04)),), seeds=2)
    names = ["kl_coef=0.0,seed=0", "kl_coef=0.04,seed=0", "kl_coef=0.0,seed=1", "kl_coef=0.04,seed=1"]
    calls, groups = [], []
    recs = run_sweep(base, sw, tmp_path / "a", run_fn=fake_run(calls), vectorize=True,
                     group_fn=fake_group(groups, refuse=True), say=lambda m: None)
    assert groups == [names] and calls == names and [r["status"] for r in recs] == ["ran"] * 4
    groups.clear()
    recs = run_sweep(base, sw, tmp_path / "b", run_fn=fake_run(calls), vectorize=True,
                     group_fn=fake_group(groups, fail=(names[1],)), say=lambda m: None)
    assert [r["status"] for r in recs] == ["ran", "failed", "ran", "ran"]
    assert recs[1]["error"] == "NumericFault: nan"
    assert "NumericFault" in (tmp_path / "b" / names[1] / "sweep_error.txt").read_text()
    calls.clear()  # --no-vectorize: every run alone
    run_sweep(base, sw, tmp_path / "c", run_fn=fake_run(calls), group_fn=fake_group(groups),
              say=lambda m: None)
    assert calls == names


def test_a_changed_sweep_is_refused_with_the_difference(base, tmp_path):
    sw = Sweep(grid=(("grpo.kl_coef", (0.0, 0.04)),))
    run_sweep(base, sw, tmp_path, run_fn=fake_run([]), say=lambda m: None)
    calls = []
    with pytest.raises(SweepError) as e:
        run_sweep(base, Sweep(grid=(("grpo.kl_coef", (0.0, 0.01)),)), tmp_path, run_fn=fake_run(calls))
    assert "grid grpo.kl_coef: [0.0, 0.04] in sweep.json, now [0.0, 0.01]" in str(e.value)
    with pytest.raises(SweepError) as e:
        run_sweep(base, Sweep(grid=(("grpo.group_size", (4, 8)),)), tmp_path, run_fn=fake_run(calls))
    assert "grid grpo.kl_coef" in str(e.value) and "grid grpo.group_size: new in the grid" in str(e.value)
    with pytest.raises(SweepError) as e:
        run_sweep(dataclasses.replace(base, steps=3), sw, tmp_path, run_fn=fake_run(calls))
    assert "base config steps: 80 in sweep.json, now 3" in str(e.value)
    with pytest.raises(SweepError, match="hold: 'prompts' in sweep.json, now 'completions'"):
        run_sweep(base, dataclasses.replace(sw, hold="completions"), tmp_path, run_fn=fake_run(calls))
    assert calls == []


TINY_SETS = ["--set", "steps=2", "--set", "prompts_per_step=2", "--set", "grpo.group_size=2",
             "--set", "pretrain=none", "--set", "model.init.num_layers=1", "--set", "data.eval_problems=4",
             "--set", "eval.samples=1", "--set", "eval.batch_prompts=4", "--set", "eval.every=1",
             "--set", "sampler.max_new_tokens=6", "--set", "log.progress=false",
             "--set", "log.tensorboard=false", "--set", "log.samples_every=0", "--set", "grpo.kl_coef=0"]


@pytest.mark.slow
def test_sweep_command_runs_resumes_and_compares(tmp_path, monkeypatch, capsys):
    """Two real tiny runs through `grpo-jax sweep`, then the same command again: nothing reruns."""
    # --no-compile-cache: a persistent cache would outlive this test in the pytest process
    argv = [str(TINY), "--seeds", "2", "--out", str(tmp_path), "--no-compile-cache", *TINY_SETS]
    recs = sweep_main(argv)
    assert [r["status"] for r in recs] == ["ran", "ran"]
    runs = [tmp_path / "seed=0", tmp_path / "seed=1"]
    for d in runs:
        assert (d / "summary.json").exists() and (d / "sweep_run.json").exists()
        assert [json.loads(l)["step"] for l in (d / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((runs[1] / "config.json").read_text())["seed"] == 1
    assert json.loads((tmp_path / "sweep.json").read_text())["base"]["steps"] == 2
    md = (tmp_path / "compare.md").read_text()
    assert "| all runs | 2 |" in md and "seed=0 (pass@1 " in md
    assert (tmp_path / "compare.png").stat().st_size > 0
    mtimes = [(d / "summary.json").stat().st_mtime_ns for d in runs]

    calls = []
    monkeypatch.setattr(runner, "run", lambda exp, name="": calls.append(name))
    recs = sweep_main(argv + ["--no-compare"])
    assert calls == [] and [r["status"] for r in recs] == ["done", "done"]
    assert [(d / "summary.json").stat().st_mtime_ns for d in runs] == mtimes
    with pytest.raises(SystemExit) as e:  # another grid into the same directory
        sweep_main(argv + ["--grid", "grpo.kl_coef=0,0.01"])
    assert e.value.code == 2 and "grid grpo.kl_coef: new in the grid" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        sweep_main([str(TINY), "--grid", "grpo.kl_coeff=0", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "did you mean 'grpo.kl_coef'" in capsys.readouterr().err
    assert calls == []


# ----------------------------------------------------------------------------- compare


def write_run(d: Path, base, *, kl: float, seed: int, passes, formats, finished=True,
              restart_row=None):
    """A run directory with known numbers: evals at steps 0, 10, 20; metrics at every step."""
    d.mkdir(parents=True)
    exp = dataclasses.replace(base, seed=seed, run_dir=str(d),
                              grpo=dataclasses.replace(base.grpo, kl_coef=kl))
    (d / "config.json").write_text(json.dumps(config_dict(exp)))
    rows = [{"step": s, "reward": 0.1 * s + seed, "accuracy": 0.01 * s, "kl": kl * s,
             "response_length": 20.0, "entropy": 1.0, "clip_frac_low": 0.0, "clip_frac_high": 0.01,
             "step_s": 0.5, "rollout_s": 0.25, "rollout_tokens_per_s": 1000.0}
            for s in range(1, 21)]
    evals = [{"step": s, "pass_at_1": p, "greedy_accuracy": p, "format_rate": f, "mean_length": 20.0}
             for s, p, f in zip((0, 10, 20), passes, formats)]
    if restart_row is not None:  # a restarted run appended the same step again: the last row counts
        evals.insert(1, restart_row)
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))
    if finished:
        (d / "summary.json").write_text("{}")


@pytest.fixture()
def sweep_dir(base, tmp_path):
    d = tmp_path / "sweep"
    d.mkdir()
    (d / "sweep.json").write_text(json.dumps({"experiment": "experiments/x.py",
                                              "grid": [["grpo.kl_coef", [0.0, 0.04]]],
                                              "seeds": 2, "hold": "prompts"}))
    stale = {"step": 10, "pass_at_1": 0.9, "greedy_accuracy": 0.9, "format_rate": 0.0, "mean_length": 1}
    write_run(d / "kl_coef=0.0,seed=0", base, kl=0.0, seed=0, passes=(0.1, 0.3, 0.5),
              formats=(0.2, 0.8, 0.9), restart_row=stale)
    write_run(d / "kl_coef=0.0,seed=1", base, kl=0.0, seed=1, passes=(0.1, 0.2, 0.3),
              formats=(0.2, 0.9, 1.0))
    write_run(d / "kl_coef=0.04,seed=0", base, kl=0.04, seed=0, passes=(0.0, 0.1, 0.2),
              formats=(0.2, 0.5, 0.6))
    write_run(d / "kl_coef=0.04,seed=1", base, kl=0.04, seed=1, passes=(0.0, 0.1, 0.2),
              formats=(0.2, 0.5, 0.6))
    write_run(d / "kl_coef=0.04,seed=2", base, kl=0.04, seed=2, passes=(0.9, 0.9, 0.9),
              formats=(1, 1, 1), finished=False)
    return d


def test_compare_table_values_by_hand(sweep_dir):
    res = compare([sweep_dir], threshold=0.3, metrics=("reward", "kl", "clip_frac", "nope"),
                  say=lambda m: None)
    md = (sweep_dir / "compare.md").read_text()
    a, b = res["settings"]
    assert a["label"] == "kl_coef=0.0" and b["label"] == "kl_coef=0.04" and a["seeds"] == 2
    # final pass@1 0.5 and 0.3: mean 0.4, sample std sqrt(2 * 0.1^2 / 1) = 0.1414
    assert a["final_pass_at_1"]["mean"] == pytest.approx(0.4)
    assert a["final_pass_at_1"]["std"] == pytest.approx(0.1414214, abs=1e-6)
    # the seed-mean curve 0.1, 0.25, 0.4 first reaches 0.3 at step 20 (seed 0 alone: step 10)
    assert a["steps_to_threshold"] == 20 and b["steps_to_threshold"] == "never"
    # AUC seed 0: ((0.1+0.3)/2*10 + (0.3+0.5)/2*10) / 20 = 0.3; seed 1: (1.5 + 2.5) / 20 = 0.2
    assert a["auc_pass_at_1"]["values"] == pytest.approx([0.3, 0.2])
    assert b["auc_pass_at_1"]["mean"] == pytest.approx(0.1) and b["auc_pass_at_1"]["std"] == 0
    assert a["final_format_rate"]["mean"] == pytest.approx(0.95)
    assert "| kl_coef=0.0 | 2 | 0.400 ± 0.141 | 20 | 0.250 ± 0.071 | 0.950 ± 0.071 |" in md
    assert "| kl_coef=0.04 | 2 | 0.200 ± 0.000 | never | 0.100 ± 0.000 | 0.600 ± 0.000 |" in md
    assert "kl_coef=0.04,seed=2" in md.split("unfinished")[1]  # left out, and said so
    assert res["metrics"] == ["reward", "kl", "clip_frac_high", "clip_frac_low"]
    assert res["missing_metrics"] == ["nope"]
    assert (sweep_dir / "compare.png").stat().st_size > 10_000
    assert json.loads((sweep_dir / "compare.json").read_text())["settings"][0]["steps_to_threshold"] == 20


def test_compare_x_axes(sweep_dir, tmp_path):
    res = compare([sweep_dir], x="samples", out=tmp_path / "s", say=lambda m: None)
    assert res["settings"][0]["samples_to_threshold"] == pytest.approx(20 * 16 * 8)  # B x G per step
    res = compare([sweep_dir], x="tokens", out=tmp_path / "t", say=lambda m: None)
    assert res["settings"][0]["tokens_to_threshold"] == pytest.approx(20 * 250.0)  # 1000 tok/s x 0.25 s
    res = compare([sweep_dir], x="wall", out=tmp_path / "w", say=lambda m: None)
    assert res["settings"][0]["wall_to_threshold"] == pytest.approx(10.0)
    assert "completions sampled to pass@1 ≥ 0.3" in (tmp_path / "s" / "compare.md").read_text()


def test_compare_is_deterministic(sweep_dir, tmp_path):
    compare_main([str(sweep_dir), "--out", str(tmp_path / "one")])
    compare_main([str(sweep_dir), "--out", str(tmp_path / "two")])
    assert (tmp_path / "one" / "compare.md").read_bytes() == (tmp_path / "two" / "compare.md").read_bytes()
    runs = sorted(p for p in sweep_dir.iterdir() if p.is_dir())
    compare([str(p) for p in runs], out=tmp_path / "fwd", say=lambda m: None)
    compare([str(p) for p in reversed(runs)], out=tmp_path / "rev", say=lambda m: None)
    fwd = (tmp_path / "fwd" / "compare.md").read_text()
    assert fwd == (tmp_path / "rev" / "compare.md").read_text()
    assert fwd.index("| kl_coef=0.0 |") < fwd.index("| kl_coef=0.04 |")
