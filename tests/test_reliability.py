"""Reliability: checkpoints, exact resume after SIGTERM / SIGKILL, numeric faults, bad input
with clear errors, and export back to Hugging Face."""

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from grpo_jax.checkpoints import CheckpointMismatch, Checkpointer, export, load_policy
from grpo_jax.config import (CheckpointConfig, DataConfig, EvalConfig, Experiment, GRPOConfig,
                             LogConfig, ModelConfig, ModelSource, OptimConfig, PretrainConfig,
                             RewardConfig, SamplerConfig)
from grpo_jax.runner import (PREEMPTED_EXIT, ConfigMismatch, NumericFault, read_jsonl, run)

ROOT = Path(__file__).parent.parent
TIMING = ("_s", "tokens_per_s", "wall_s", "run_dir")

# The experiment the subprocess tests run: small enough to compile and train in seconds.
EXPERIMENT_FILE = '''
from grpo_jax.config import *
CONFIG = Experiment(
    seed=3, steps=6, prompts_per_step=4,
    model=ModelSource(init=ModelConfig(arch="qwen2", vocab_size=96, hidden_size=32,
                                       intermediate_size=64, num_layers=1, num_heads=2,
                                       num_kv_heads=1, attention_bias=True,
                                       tie_word_embeddings=True)),
    pretrain=PretrainConfig(steps=4, batch_size=8),
    data=DataConfig(task="arithmetic", task_args='{"digits": [1, 1], "operators": "+"}',
                    template="short", max_prompt_tokens=32, eval_problems=8),
    sampler=SamplerConfig(max_new_tokens=12, temperature=1.0),
    grpo=GRPOConfig(group_size=4, kl_coef=0.04, mu=2),
    optim=OptimConfig(lr=1e-2),
    rewards=RewardConfig(weights=(("accuracy", 1.0), ("format_partial", 1.0))),
    eval=EvalConfig(every=3, samples=2, batch_prompts=8),
    checkpoint=CheckpointConfig(every=2, keep=2),
    log=LogConfig(progress=False, tensorboard=False, samples_every=1),
)
'''


def _exp(tmp_path, **kw) -> Experiment:
    ns = {}
    exec(EXPERIMENT_FILE, ns)
    return dataclasses.replace(ns["CONFIG"], run_dir=str(tmp_path / "run"), **kw)


def _untimed(rows):
    return [{k: v for k, v in r.items() if not k.endswith(TIMING)} for r in rows]


def _final_params(run_dir: Path):
    cfg, params, tok, step = load_policy(run_dir)
    return step, params


# ----------------------------------------------------------------------------- checkpoints


def test_checkpointer_keeps_newest_and_milestones_and_restores_optimizer_state(tmp_path):
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    ck = Checkpointer(tmp_path / "ck", keep=2, milestone_every=4)
    for step in range(1, 8):
        ck.save(step, {"params": jax.tree.map(lambda x: x + step, params), "opt_state": opt_state},
                {"wall_s": float(step)})
    ck.wait()
    assert ck.steps() == [4, 6, 7]  # the newest two, plus the milestone 4
    items, meta = ck.restore(6, {"params": params, "opt_state": opt_state})
    np.testing.assert_array_equal(items["params"]["w"], params["w"] + 6)
    assert jax.tree.structure(items["opt_state"]) == jax.tree.structure(opt_state)
    assert meta["wall_s"] == 6.0 and meta["step"] == 6
    with pytest.raises(CheckpointMismatch, match=r"\['w'\].*\[2, 3\].*\[3, 3\]"):
        ck.restore(6, {"params": {"w": jnp.zeros((3, 3)), "b": jnp.ones(3)}})
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 5.*available steps"):
        ck.restore(5, {"params": params})
    ck.close()


def test_a_half_written_checkpoint_leaves_the_previous_one_loadable(tmp_path):
    params = {"w": jnp.ones(4)}
    ck = Checkpointer(tmp_path / "ck", keep=3, async_save=False)
    ck.save(1, {"params": params}, {})
    ck.close()
    # What a kill during the next save leaves behind: orbax's temporary directory.
    (tmp_path / "ck" / "step_2.orbax-checkpoint-tmp-123").mkdir()
    (tmp_path / "ck" / "step_2.orbax-checkpoint-tmp-123" / "junk").write_text("partial")
    ck = Checkpointer(tmp_path / "ck", keep=3)
    assert ck.latest_step() == 1
    items, _ = ck.restore(1, {"params": params})
    np.testing.assert_array_equal(items["params"]["w"], np.ones(4))
    ck.close()


# ----------------------------------------------------------------------------- exact resume


# The subprocess runs add a reward that only takes time (0.3 s a step, always 0.0, so advantages and
# parameters do not change). Without it a step takes 10-40 ms and the run could finish between the
# test seeing row n and its signal arriving (that made the SIGTERM below land in the last step once).
PACED_EXPERIMENT_FILE = EXPERIMENT_FILE + '''
import dataclasses
import time
from grpo_jax.rewards import register_reward

@register_reward("paced", overwrite=True)
def paced(prompts, completions, **fields):
    time.sleep(0.3)
    return [0.0] * len(completions)

CONFIG = dataclasses.replace(CONFIG, steps=8, rewards=RewardConfig(
    weights=CONFIG.rewards.weights + (("paced", 1.0),)))
'''


def _start(exp_file: Path, run_dir: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "grpo_jax.cli", "run", str(exp_file), "--run-dir", str(run_dir),
           *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})


def _wait_for_rows(proc: subprocess.Popen, path: Path, n: int, timeout: float = 300) -> None:
    t0 = time.time()
    while len(read_jsonl(path)) < n:
        assert proc.poll() is None, f"finished before {n} rows: {proc.stdout.read()[-3000:]}"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.05)


def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path):
    """SIGTERM (graceful: checkpoint, exit 75) and SIGKILL (no warning, between checkpoints) at
    random points; each time the same command resumes. Metrics, evaluations and final
    parameters equal those of an uninterrupted run bit for bit."""
    seed = random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    exp_file = tmp_path / "exp.py"
    exp_file.write_text(PACED_EXPERIMENT_FILE)

    ref = _start(exp_file, tmp_path / "ref")
    out = ref.communicate(timeout=600)[0]
    assert ref.returncode == 0, out[-3000:]

    run_dir = tmp_path / "interrupted"
    # 1. SIGTERM after a random number of logged steps: checkpoint, exit code 75.
    proc = _start(exp_file, run_dir)
    # Early enough that the signal is handled before the last of the 8 steps even when a compile
    # holds the main thread for seconds (a SIGTERM handled in the last step lets the run finish).
    _wait_for_rows(proc, run_dir / "metrics.jsonl", rng.randint(1, 2))
    time.sleep(rng.uniform(0, 0.3))
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == PREEMPTED_EXIT, f"seed {seed}: {out[-3000:]}"
    assert "got SIGTERM" in out
    # 2. Resume, then SIGKILL at a random later point (possibly mid-checkpoint or mid-eval).
    proc = _start(exp_file, run_dir)
    _wait_for_rows(proc, run_dir / "metrics.jsonl", min(len(read_jsonl(run_dir / "metrics.jsonl")) + 1, 5))
    time.sleep(rng.uniform(0, 1.0))
    proc.kill()
    proc.communicate(timeout=60)
    # 3. Resume to the end.
    proc = _start(exp_file, run_dir)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, f"seed {seed}: {out[-3000:]}"

    for name in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"):
        a, b = read_jsonl(tmp_path / "ref" / name), read_jsonl(run_dir / name)
        assert _untimed(a) == _untimed(b), f"seed {seed}: {name} differs"
    step_a, pa = _final_params(tmp_path / "ref")
    step_b, pb = _final_params(run_dir)
    assert step_a == step_b == 8
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(x, y, err_msg=f"seed {seed}")
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 8
    assert not list(run_dir.rglob("*.tmp")) and not list(run_dir.rglob("*orbax-checkpoint-tmp*"))


def test_rollouts_over_cpu_devices_equal_one_device(tmp_path):
    """`grpo-jax run` decodes over 2 CPU devices (one program each) and trains on one; the
    metrics, evaluations, samples and final weights equal those of a one-device run."""
    exp_file = tmp_path / "exp.py"
    exp_file.write_text(EXPERIMENT_FILE)
    logs = {}
    for n in (2, 1):
        proc = _start(exp_file, tmp_path / f"dev{n}", "--steps", "3", "--cpu_devices", str(n))
        logs[n] = proc.communicate(timeout=600)[0]
        assert proc.returncode == 0, logs[n][-3000:]
    assert "rollouts and evaluations data-parallel over 2 CPU devices" in logs[2]
    assert "data-parallel" not in logs[1]
    for name in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"):
        a, b = (_untimed(read_jsonl(tmp_path / f"dev{n}" / name)) for n in (1, 2))
        assert a and len(a) == len(b), name
        for ra, rb in zip(a, b):
            # The sampler's own log-probs come from 32-row instead of 64-row matmuls: the same
            # to float32 rounding (the tokens, hence everything else, are identical).
            gap = "logp_gap_sampler"
            assert ra.pop(gap, 0.0) == pytest.approx(rb.pop(gap, 0.0), rel=1e-4, abs=1e-6), name
            assert ra == rb, name
    (step_a, pa), (step_b, pb) = (_final_params(tmp_path / f"dev{n}") for n in (1, 2))
    assert step_a == step_b == 3
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
        np.testing.assert_array_equal(x, y)


def test_a_finished_run_is_not_rerun_and_can_be_extended(tmp_path):
    exp = _exp(tmp_path, steps=2, pretrain=None, eval=EvalConfig(samples=1, batch_prompts=8))
    first = run(exp)
    assert run(exp) == first  # finished: nothing to do
    more = run(dataclasses.replace(exp, steps=3, allow_config_change=True))
    assert more["steps"] == 3
    assert [r["step"] for r in read_jsonl(Path(exp.run_dir) / "metrics.jsonl")] == [1, 2, 3]
    changes = read_jsonl(Path(exp.run_dir) / "config_changes.jsonl")
    assert changes[0]["changes"] == ["steps: 2 -> 3"]


# ----------------------------------------------------------------------------- faults and bad input


def test_nonfinite_steps_in_a_row_stop_the_run(tmp_path, monkeypatch):
    from grpo_jax import loss as L

    exp = _exp(tmp_path, pretrain=None, max_nonfinite_steps=2, checkpoint=CheckpointConfig(every=1))
    real = L.compute_advantages
    calls = {"n": 0}

    def poisoned(r, *a, **k):  # step 1 is fine, every later one is NaN
        calls["n"] += 1
        return real(r, *a, **k) * (1.0 if calls["n"] == 1 else np.nan)

    monkeypatch.setattr(L, "compute_advantages", poisoned)
    with pytest.raises(NumericFault, match=r"steps 2-3: 2 steps in a row .* last checkpoint is step"):
        run(exp)
    rows = read_jsonl(Path(exp.run_dir) / "metrics.jsonl")
    assert [r["skipped_updates"] for r in rows][:3] == [0.0, 2.0, 2.0]  # mu = 2 updates a step


def test_resuming_with_another_config_lists_the_differences(tmp_path):
    exp = _exp(tmp_path, steps=1, pretrain=None, eval=EvalConfig(samples=1, batch_prompts=8))
    run(exp)
    other = dataclasses.replace(exp, steps=4, grpo=dataclasses.replace(exp.grpo, kl_coef=0.1))
    with pytest.raises(ConfigMismatch) as e:
        run(other)
    msg = str(e.value)
    assert "grpo.kl_coef: 0.04 -> 0.1" in msg and "steps: 1 -> 4" in msg
    assert "--allow-config-change True" in msg


def test_how_to_run_fields_may_change_on_resume():
    """A run made before `SamplerConfig.cache_windows` or `SFTStage.checkpoint_minutes` existed
    (or with other values, in any stage) resumes: they change how the work runs, not its
    result. So does another process of a multi-host run, or a new coordinator (`dist`)."""
    from grpo_jax.runner import config_diff

    old = {"sampler": {"temperature": 1.0}, "log": {"progress": True},
           "dist": {"coordinator_address": "10.0.0.1:1234", "process_id": 0},
           "stages": [{"name": "rl", "sampler": {"cache_windows": 4}},
                      {"name": "sft", "epochs": 2}]}
    new = {"sampler": {"temperature": 0.9, "cache_windows": 4}, "log": {"progress": False},
           "dist": {"coordinator_address": "10.0.0.2:999", "process_id": 1},
           "stages": [{"name": "rl", "sampler": {"cache_windows": 1}},
                      {"name": "sft", "epochs": 3, "checkpoint_minutes": 10.0}]}
    # a pipeline's stages are compared field by field, each named by its stage
    assert config_diff(old, new) == ["sampler.temperature: 1.0 -> 0.9", "stages.sft.epochs: 2 -> 3"]


def test_a_checkpoint_from_another_model_is_refused(tmp_path):
    exp = _exp(tmp_path, steps=2, pretrain=None, checkpoint=CheckpointConfig(every=1),
               eval=EvalConfig(samples=1, batch_prompts=8))
    run(dataclasses.replace(exp, steps=1))
    bigger = dataclasses.replace(exp.model.init, hidden_size=48)
    other = dataclasses.replace(exp, model=ModelSource(init=bigger), allow_config_change=True)
    with pytest.raises(CheckpointMismatch, match=r"another model: weight \['embed'\] has shape "
                                                 r"\[96, 32\] in the checkpoint but \[96, 48\]"):
        run(other)


def test_unwritable_or_full_run_directory_is_found_before_training(tmp_path, monkeypatch):
    import shutil

    blocker = tmp_path / "a_file"  # a run directory below a file cannot be created, even by root
    blocker.write_text("")
    with pytest.raises(OSError, match="not writable.*--run-dir"):
        run(dataclasses.replace(_exp(tmp_path), run_dir=str(blocker / "run")))

    full = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: full)
    with pytest.raises(OSError, match=r"GiB free on its disk.*--checkpoint.keep"):
        run(_exp(tmp_path, pretrain=None))
    d = tmp_path / "run"
    assert not (d / "checkpoints").exists() or not any((d / "checkpoints").iterdir())
    assert not list(d.rglob("*.tmp"))


def test_overrides_are_checked_with_suggestions_and_ranges(tmp_path, capsys):
    from grpo_jax.runner import main

    exp_file = tmp_path / "exp.py"
    exp_file.write_text(EXPERIMENT_FILE)
    with pytest.raises(SystemExit):
        main([str(exp_file), "--grpo.kl-coeff", "0.1"])
    err = capsys.readouterr()
    assert "kl-coef" in (err.out + err.err)  # the closest field is suggested
    with pytest.raises(SystemExit):
        main([str(exp_file), "--steps", "many"])
    assert "many" in "".join(capsys.readouterr())
    with pytest.raises(SystemExit):
        main([str(exp_file), "--grpo.group-size", "1"])
    assert "grpo.group_size: must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(exp_file), "--prompts-per-step", "6", "--grpo.minibatches", "4"])
    err = " ".join(capsys.readouterr().err.split())
    assert "prompts_per_step = 6 must split evenly" in err and "grpo.minibatches (4)" in err
    assert not (tmp_path / "run").exists()  # nothing was written for a rejected config


def test_prompts_longer_than_the_limit_fail_or_are_truncated(tmp_path):
    exp = _exp(tmp_path, steps=1, pretrain=None, eval=EvalConfig(samples=1, batch_prompts=8),
               data=dataclasses.replace(_exp(tmp_path).data, max_prompt_tokens=6))
    with pytest.raises(ValueError, match=r"tokens, more than data.max_prompt_tokens=6.*"
                                         r"--data.long-prompts truncate"):
        run(exp)
    exp = dataclasses.replace(exp, run_dir=str(tmp_path / "trunc"),
                              data=dataclasses.replace(exp.data, long_prompts="truncate"))
    assert run(exp)["steps"] == 1


def test_dataset_files_with_missing_fields_or_no_rows_are_named(tmp_path):
    from grpo_jax.tasks import get_task

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "1+1?", "answer": "so #### 2"}) + "\n" +
                   json.dumps({"question": "2+2?"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: missing field 'answer'"):
        get_task("gsm8k", path=str(bad), eval_path=str(bad)).eval(2)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty.jsonl: the dataset is empty"):
        get_task("gsm8k", path=str(empty), eval_path=str(empty)).eval(2)


# ----------------------------------------------------------------------------- export


def test_export_any_checkpoint_reloads_in_transformers(tmp_path):
    import torch
    import transformers

    from grpo_jax import model as M
    from grpo_jax.cli import main as cli_main

    exp = _exp(tmp_path, steps=2, pretrain=None, checkpoint=CheckpointConfig(every=1, keep=3),
               eval=EvalConfig(samples=1, batch_prompts=8))
    run(exp)
    for step in (1, 2):
        out = tmp_path / f"export_{step}"
        cli_main(["export", exp.run_dir, str(out), "--step", str(step)])
        cfg, params, tok, got = load_policy(exp.run_dir, step)
        assert got == step
        hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        ids = np.asarray([tok("User: 3+4= Assistant: <think>").input_ids])
        with torch.no_grad():
            theirs = hf(torch.tensor(ids)).logits.numpy()
        ours = np.asarray(M.forward(jax.tree.map(jnp.asarray, params), jnp.asarray(ids), cfg))
        assert np.abs(ours - theirs).max() < 1e-4
        assert json.loads((out / "grpo_jax_source.json").read_text())["step"] == step
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(exp.run_dir, tmp_path / "export_1", 1)
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 7"):
        export(exp.run_dir, tmp_path / "export_7", 7)
    assert not (tmp_path / "export_7").exists() and not (tmp_path / ".export_7.tmp").exists()


PIPELINE_FILE = '''
from grpo_jax.config import *
from grpo_jax.pipeline import Pipeline, PretrainStage, SFTStage
from grpo_jax.sft import SFTConfig
TINY = ModelConfig(arch="qwen2", vocab_size=112, hidden_size=32, intermediate_size=64, num_layers=1,
                   num_heads=2, num_kv_heads=1, attention_bias=True, tie_word_embeddings=True)
PIPELINE = Pipeline(
    seed=2, progress=False,
    data=DataConfig(task="arithmetic", task_args='{"digits": [1, 1], "operators": "+"}',
                    template="short", max_prompt_tokens=32, eval_problems=8),
    stages=(PretrainStage(name="base", model=TINY, max_len=64,
                          pretrain=PretrainConfig(steps=5, batch_size=8, words=True, second_script=0.5)),
            SFTStage(name="sft", policy="base", curated=256, checkpoint_minutes=0.005,
                     sft=SFTConfig(epochs=12, batch_size=8, max_len=64, optim=OptimConfig(lr=1e-2)))),
)
'''


def test_interrupted_sft_stage_resumes_to_the_same_result(tmp_path):
    """SIGTERM inside an SFT stage (its state saved, exit 75) and SIGKILL in a rerun (which
    resumed from that state and saved its own every 0.3 s); the pipeline then finishes from the
    last saved state with the weights of an uninterrupted run, bit for bit."""
    seed = random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    exp_file = tmp_path / "pipe.py"
    exp_file.write_text(PIPELINE_FILE)
    ref = _start(exp_file, tmp_path / "ref")
    out = ref.communicate(timeout=600)[0]
    assert ref.returncode == 0, out[-3000:]

    run_dir = tmp_path / "interrupted"

    def start_and_wait_for_sft():
        proc = _start(exp_file, run_dir)
        t0 = time.time()
        while not (run_dir / "sft").exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.time() - t0 < 300
            time.sleep(0.05)
        time.sleep(rng.uniform(0.5, 2.0))
        return proc

    proc = start_and_wait_for_sft()
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    if proc.returncode == 0:  # it finished before the signal: nothing to resume (rare)
        pytest.skip(f"seed {seed}: the SFT stage ended before SIGTERM")
    assert proc.returncode == PREEMPTED_EXIT, f"seed {seed}: {out[-3000:]}"
    assert "stopping in stage sft; it resumes after update" in out
    assert (run_dir / "sft" / "sft_state").is_dir()
    assert not (run_dir / "sft" / "stage.json").exists()
    proc = start_and_wait_for_sft()
    proc.kill()
    proc.communicate(timeout=60)
    proc = _start(exp_file, run_dir)
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, f"seed {seed}: {out[-3000:]}"
    assert "stage base: complete, skipped" in out and "sft: resuming after update" in out
    assert not (run_dir / "sft" / "sft_state").exists()  # removed once the stage is complete
    for name in ("model.safetensors", "config.json"):
        a = (tmp_path / "ref" / "sft" / "hf_model" / name).read_bytes()
        assert a == (run_dir / "sft" / "hf_model" / name).read_bytes(), f"seed {seed}: {name}"
