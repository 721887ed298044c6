"""Launch tooling: the TPU launcher's commands, dry run and restart logic (an injected executor,
and its remote shell scripts run for real against a fake `gcloud`), and scripts/run_gpu.sh."""

import dataclasses
import importlib.util
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "scripts" / "launch_tpu.py"
RUN_GPU = ROOT / "scripts" / "run_gpu.sh"

_spec = importlib.util.spec_from_file_location("launch_tpu", LAUNCH)
lt = importlib.util.module_from_spec(_spec)
sys.modules["launch_tpu"] = lt  # dataclasses look their module up
_spec.loader.exec_module(lt)

RUN = ("grpo-jax", "run", "experiments/gsm8k_qwen25_15b.py", "--run-dir", "/mnt/shared/runs/g15",
       "--mesh.axes", "data", "1", "fsdp", "-1", "tensor", "1")
UP = ["up", "--name", "grpo-v5e", "--zone", "us-west4-a", "--accelerator-type", "v5litepod-8",
      "--spot", "--dry-run", "--", *RUN]


def spec(**kw) -> "lt.Spec":
    return lt.Spec(**({"name": "grpo-v5e", "zone": "us-west4-a", "command": RUN,
                       "restart_delay": 0.0} | kw))


def command_of(step) -> str:
    """The remote script of an ssh step."""
    return next(a for a in step.argv if a.startswith("--command="))[len("--command="):]


# ----------------------------------------------------------------------------- dry run


def dry_run_blocks(text: str) -> list[tuple[str, str]]:
    """(header, command) per numbered step of the main sequence (the restart plan excluded)."""
    main = text.split("\n# If the run exits")[0]
    blocks = re.split(r"^\[(\d+)\] ", main, flags=re.M)[1:]
    out = []
    for num, body in zip(blocks[::2], blocks[1::2]):
        head, _, rest = body.partition("\n")
        cmd = "\n".join(line for line in rest.splitlines() if not line.startswith("#")).strip()
        out.append((head, cmd))
    assert [int(n) for n in blocks[::2]] == list(range(1, len(out) + 1))
    return out


def test_dry_run_prints_every_command_in_order_and_runs_none(capsys, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the dry run executed a command")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(subprocess, "Popen", refuse)
    assert lt.main(UP) == 0
    text = capsys.readouterr().out
    argvs = [shlex.split(cmd) for _, cmd in dry_run_blocks(text)]
    tpu = ["gcloud", "compute", "tpus", "tpu-vm"]
    assert all(a[:4] == tpu for i, a in enumerate(argvs) if i != 2)
    verbs = [a[4] if a[:4] == tpu else a[0] for a in argvs]
    assert verbs == ["describe", "create", "tar", "scp", "ssh", "ssh", "ssh", "ssh"]
    describe, create, pack, copy, fetch, install, start, stream = argvs
    assert describe[5:] == ["grpo-v5e", "--zone=us-west4-a", "--format=value(state)"]
    assert create[5:] == ["grpo-v5e", "--zone=us-west4-a", "--accelerator-type=v5litepod-8",
                          "--version=v2-alpha-tpuv5-lite", "--spot"]
    assert "--exclude=.git" in pack and "--exclude=runs" in pack
    assert copy[-2:] == ["--zone=us-west4-a", "--worker=all"] and copy[5] == pack[2]
    for a in (fetch, install, start):
        assert "--worker=all" in a
    assert "tar -xzf grpo_jax-src.tar.gz -C grpo_jax" in fetch[-1]
    assert 'pip install -q -e ".[tpu]"' in install[-1] and "uv venv" in install[-1]
    assert shlex.join(RUN) in start[-1] and "setsid nohup bash grpo-logs/job.sh" in start[-1]
    assert "--worker=0" in stream and "tail -n +1" in stream[-1]
    # the restart plan: a preempted VM is deleted and recreated, a leftover run stopped
    plan = text.split("\n# If the run exits 75")[1]
    assert "gcloud compute tpus tpu-vm delete grpo-v5e --zone=us-west4-a --quiet" in plan
    assert "[R3] create the spot TPU VM grpo-v5e (v5litepod-8): as [2]" in plan
    assert 'kill -TERM -- "-$pid"' in plan


def test_printed_commands_are_the_executed_argv_and_valid_bash():
    steps = []

    def record(step):
        steps.append(step)
        return lt.DryRun(open(os.devnull, "w"))(step)

    s = spec(repo="https://github.com/me/grpo_jax.git", ref="v1", env=(("HF_TOKEN", "a b'c"),),
             setup="mountpoint -q /mnt/shared || sudo mount /mnt/shared")
    assert lt.up(s, record, sleep=lambda _: None, say=lambda _: None) == 0
    steps += [lt.cleanup_step(s), lt.stop_step(s), lt.status_step(s), lt.tail_all_step(s)]
    assert {st.kind for st in steps} >= {"describe", "create", "fetch", "setup", "install",
                                         "start", "stream", "cleanup", "stop", "status", "logs"}
    for st in steps:
        assert shlex.split(st.shell()) == list(st.argv)  # what is printed is what runs
        if st.argv[4] == "ssh":
            script = command_of(st)
            assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0, script
    start = next(st for st in steps if st.kind == "start")
    job = command_of(start).split("<< \\GRPO_JOB\n")[1].split("\nGRPO_JOB\n")[0]
    assert ("export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=\"$HOME/.cache/jax-compilation\" "
            "HF_TOKEN='a b'\"'\"'c' &&") in job
    assert shlex.join(RUN) in job


@pytest.mark.parametrize("argv, message", [
    (["up", "--name", "x", "--zone", "z", "--", "grpo-jax", "run", "e.py"], "needs --run-dir"),
    (["up", "--name", "x", "--zone", "z"], "give the command to run"),
    (["run", "--name", "X_1", "--zone", "z", "--", "true"], "--name 'X_1'"),
    (["run", "--name", "x", "--zone", "z", "--env", "A", "--", "true"], "expected KEY=VALUE"),
    (["run", "--name", "x", "--zone", "z", "--remote-dir", "../a", "--", "true"], "--remote-dir"),
])
def test_bad_launches_are_refused_before_any_command(argv, message, capsys):
    cut = argv.index("--") if "--" in argv else len(argv)
    assert lt.main(argv[:cut] + ["--dry-run"] + argv[cut:]) == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- restart logic


class FakeCloud:
    """An executor that answers like gcloud: `states` for successive describes (the last one
    repeats), `streams` for successive log streams (an int: the run's exit code; None: the
    stream broke before the run ended; "stopped": `stop` asked, exit 75)."""

    def __init__(self, streams, states=("READY",)):
        self.streams, self.states, self.kinds = list(streams), list(states), []

    def __call__(self, step):
        self.kinds.append(step.kind)
        if step.kind == "describe":
            state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
            return lt.Result(0, state + "\n") if state else lt.Result(1, "", "NOT_FOUND")
        if step.kind == "stream":
            code = self.streams.pop(0)
            if code is None:
                return lt.Result(255, "[grpo-jax] step 7 ...\n")
            if code == "stopped":
                return lt.Result(0, "[launch] stopped on request\n"
                                    "[launch] run exited with code 75\n")
            return lt.Result(0, f"[grpo-jax] done\n[launch] run exited with code {code}\n")
        return lt.Result(0)

    def count(self, kind):
        return self.kinds.count(kind)


def launch(cloud, **kw):
    return lt.run_loop(spec(**kw), cloud, sleep=lambda _: None, say=lambda _: None)


def test_exit_75_restarts_until_the_run_finishes():
    cloud = FakeCloud([75, 75, 0])
    assert launch(cloud) == 0
    assert cloud.count("start") == 3 and cloud.count("stream") == 3
    assert cloud.count("cleanup") == 2  # before each restart: what is left of the run is stopped
    assert cloud.count("create") == 0 and cloud.count("install") == 0  # the VM stayed READY
    assert cloud.kinds[:2] == ["start", "stream"]
    assert cloud.kinds[2:6] == ["describe", "cleanup", "start", "stream"]


def test_other_exit_codes_are_not_retried():
    cloud = FakeCloud([1])
    assert launch(cloud) == 1
    assert cloud.count("start") == 1
    # every worker's last lines, to find the one that failed; then the others are stopped
    assert cloud.kinds[-2:] == ["logs", "cleanup"]


def test_the_restart_limit_is_honored():
    cloud = FakeCloud([75] * 10)
    assert launch(cloud, max_restarts=2) == 75
    assert cloud.count("start") == 3
    cloud = FakeCloud([75] * 10)
    assert launch(cloud, max_restarts=0) == 75
    assert cloud.count("start") == 1


def test_a_preempted_spot_vm_is_recreated_reinstalled_and_the_run_resumed():
    # the stream breaks; the VM is PREEMPTED: delete, create, install, start again
    cloud = FakeCloud([None, 0], states=["PREEMPTED"])
    assert launch(cloud, spot=True) == 0
    assert cloud.kinds == ["start", "stream", "describe", "describe", "delete", "create", "pack",
                           "copy", "fetch", "install", "cleanup", "start", "stream"]


def test_up_creates_a_missing_vm_and_reuses_a_ready_one():
    cloud = FakeCloud([0], states=[None])
    assert lt.up(spec(), cloud, sleep=lambda _: None, say=lambda _: None) == 0
    assert cloud.kinds == ["describe", "create", "pack", "copy", "fetch", "install", "start",
                           "stream"]
    cloud = FakeCloud([0], states=["READY"])
    assert lt.up(spec(), cloud, sleep=lambda _: None, say=lambda _: None, reinstall=False) == 0
    assert cloud.kinds == ["describe", "start", "stream"]
    cloud = FakeCloud([0], states=["CREATING", "READY"])
    assert lt.up(spec(), cloud, sleep=lambda _: None, say=lambda _: None, reinstall=False) == 0
    assert cloud.kinds == ["describe", "describe", "start", "stream"]


def test_a_stop_request_is_not_restarted():
    cloud = FakeCloud(["stopped", 0])
    assert launch(cloud) == 75
    assert cloud.count("start") == 1


def test_a_broken_stream_on_a_ready_vm_attaches_again_without_restarting():
    cloud = FakeCloud([None, None, 0])
    assert launch(cloud) == 0
    assert cloud.count("start") == 1 and cloud.count("stream") == 3
    cloud = FakeCloud([None] * 10)  # keeps breaking: give up watching, leave the run alone
    assert launch(cloud) == 1
    assert cloud.count("start") == 1 and cloud.count("cleanup") == 0
    assert cloud.count("stream") == lt.REATTACH + 1


def test_parse_outcome():
    assert lt.parse_outcome("x\n[launch] run exited with code 75\n") == lt.Outcome(75)
    assert lt.parse_outcome("[launch] run ended without an exit code\n") == lt.Outcome(None)
    assert lt.parse_outcome("[launch] stopped on request\n[launch] run exited with code 75") == \
        lt.Outcome(75, stopped=True)
    assert lt.parse_outcome("[grpo-jax] step 3 ...") is None


# ----------------------------------------------------------------------------- worker scripts

FAKE_GCLOUD = """#!/usr/bin/env bash
# gcloud compute tpus tpu-vm VERB ...: the VM is this machine, its home $HOME
echo "$4" >> "$HOME/gcloud.log"
case "$4" in
  describe) echo READY ;;
  ssh) for a in "$@"; do case "$a" in --command=*) cmd=${a#--command=} ;; esac; done
       exec bash -c "$cmd" ;;
esac
"""
FAKE_RUN = """#!/usr/bin/env bash
# grpo-jax stand-in: exits 75 on its first call, 0 on the second; SIGTERM -> 75
n=$(( $(cat "$HOME/calls" 2>/dev/null || echo 0) + 1 )); echo $n > "$HOME/calls"
echo "[fake] attempt $n: $*"
trap 'echo "[fake] SIGTERM: checkpoint"; exit 75' TERM
sleep "${FAKE_SLEEP:-0}" & wait $!
[ "$n" -ge 2 ] && exit 0 || exit 75
"""


@pytest.fixture
def fake_vm(tmp_path):
    if not shutil.which("setsid") or sys.platform != "linux":
        pytest.skip("the worker scripts need Linux (setsid, GNU tail)")
    home, bin_ = tmp_path / "home", tmp_path / "bin"
    for d in (home / "grpo-venv" / "bin", home / "grpo_jax", home / "fakebin", bin_):
        d.mkdir(parents=True)
    (bin_ / "gcloud").write_text(FAKE_GCLOUD)
    (home / "fakebin" / "grpo-jax").write_text(FAKE_RUN)
    (home / "grpo-venv" / "bin" / "activate").write_text('export PATH="$HOME/fakebin:$PATH"\n')
    for f in (bin_ / "gcloud", home / "fakebin" / "grpo-jax"):
        f.chmod(0o755)
    env = {**os.environ, "HOME": str(home), "PATH": f"{bin_}{os.pathsep}{os.environ['PATH']}"}
    yield home, env
    pid = home / "grpo-logs" / "run.pid"  # a job left by a failed test: its process group
    if pid.exists():
        try:
            os.killpg(int(pid.read_text()), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def launcher(*args):
    return [sys.executable, str(LAUNCH), *args]


def test_worker_scripts_run_restart_and_report_exit_codes(fake_vm):
    home, env = fake_vm
    p = subprocess.run(launcher("run", "--name", "t", "--zone", "z", "--restart-delay", "0", "--",
                                "grpo-jax", "run", "e.py", "--run-dir", "/tmp/r"),
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (home / "calls").read_text().strip() == "2"
    for n in (1, 2):
        assert f"[fake] attempt {n}: run e.py --run-dir /tmp/r" in p.stdout
    assert p.stdout.count("[launch] run exited with code 75") == 1
    assert "[launch] run exited with code 0" in p.stdout
    logs = home / "grpo-logs"
    assert (logs / "exit_code").read_text().strip() == "0"
    assert len(list(logs.glob("run-*.log"))) == 1  # the earlier attempt's log is kept


def test_stop_checkpoints_the_detached_run_and_is_not_restarted(fake_vm):
    home, env = fake_vm
    up = subprocess.Popen(launcher("run", "--name", "t", "--zone", "z", "--env", "FAKE_SLEEP=30",
                                   "--", "grpo-jax", "run", "e.py", "--run-dir", "/tmp/r"),
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 20
        while "attempt 1" not in _read(home / "grpo-logs" / "run.log") and time.time() < deadline:
            time.sleep(0.1)
        status = subprocess.run(launcher("status", "--name", "t", "--zone", "z"), env=env,
                                capture_output=True, text=True, timeout=30)
        assert "running (pid" in status.stdout
        stop = subprocess.run(launcher("stop", "--name", "t", "--zone", "z"), env=env,
                              capture_output=True, text=True, timeout=30)
        assert "SIGTERM sent" in stop.stdout
        out, _ = up.communicate(timeout=30)
    finally:
        up.kill()
    assert up.returncode == 75, out
    assert "[fake] SIGTERM: checkpoint" in out and "stopped on request" in out
    assert (home / "calls").read_text().strip() == "1"
    again = subprocess.run(launcher("logs", "--name", "t", "--zone", "z"), env=env,
                           capture_output=True, text=True, timeout=30)
    assert "[launch] run exited with code 75" in again.stdout


def _read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


# ----------------------------------------------------------------------------- run_gpu.sh


def run_gpu(*args, env=None, timeout=30):
    base = {k: v for k, v in os.environ.items()
            if k not in ("PYTHON", "XLA_PYTHON_CLIENT_MEM_FRACTION", "JAX_LOCAL_DEVICE_IDS")}
    return subprocess.run(["bash", str(RUN_GPU), *args], capture_output=True, text=True,
                          env=base | (env or {}), timeout=timeout)


def test_run_gpu_dry_run_one_host():
    p = run_gpu("--dry-run", "--install", "cuda", "--", *RUN)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert lines[1] == "[1] python3 -m pip install -e '.[cuda]'"
    assert lines[2].startswith("[2] export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 ")
    assert "PYTHONUNBUFFERED=1" in lines[2]
    assert lines[3] == "[3] " + shlex.join(RUN)
    assert "exit 75: [3] again, at most 3 times" in lines[4]
    p = run_gpu("--dry-run", "--gpus", "0", "--", *RUN,
                env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"})
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.5 " in p.stdout
    assert "CUDA_VISIBLE_DEVICES=0" in p.stdout


def test_run_gpu_dry_run_several_hosts():
    p = run_gpu("--dry-run", "--coordinator", "10.0.0.1:1234", "--num-processes", "2",
                "--process-id", "1", "--", *RUN)
    assert p.returncode == 0, p.stderr
    assert (shlex.join(RUN) + " --dist.coordinator_address 10.0.0.1:1234 --dist.num_processes 2 "
            "--dist.process_id 1") in p.stdout
    p = run_gpu("--dry-run", "--slurm", "--max-restarts", "0", "--", *RUN,
                env={"SLURM_GPUS_ON_NODE": "4", "SLURM_JOB_NUM_NODES": "2"})
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3" in p.stdout
    assert "srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 " + shlex.join(RUN) in p.stdout
    p = run_gpu("--dry-run", "--coordinator", "10.0.0.1:1234", "--", *RUN)
    assert p.returncode == 2 and "go together" in p.stderr
    p = run_gpu("--dry-run", "--", "grpo-jax", "run", "e.py")
    assert p.returncode == 0 and "no --run-dir" in p.stderr


COUNTER = 'n=$(( $(cat "$0" 2>/dev/null || echo 0) + 1 )); echo $n > "$0"; echo "try $n"; '


def test_run_gpu_restarts_on_75_only(tmp_path):
    f = str(tmp_path / "count")
    tries = lambda p: re.findall(r"^try \d+$", p.stdout, re.M)  # noqa: E731
    p = run_gpu("--", "bash", "-c", COUNTER + '[ "$n" -ge 3 ] || exit 75', f)
    assert p.returncode == 0 and tries(p) == ["try 1", "try 2", "try 3"], p.stdout + p.stderr
    assert "restart 2/3" in p.stderr
    p = run_gpu("--max-restarts", "1", "--", "bash", "-c", COUNTER + "exit 75", f + "2")
    assert p.returncode == 75 and len(tries(p)) == 2 and "no restarts left" in p.stderr
    p = run_gpu("--", "bash", "-c", COUNTER + "exit 1", f + "3")
    assert p.returncode == 1 and len(tries(p)) == 1


def test_dist_and_mesh_flags_parse_against_the_experiment_config():
    """The flags the launchers pass, parsed as `grpo-jax run` parses overrides."""
    from grpo_jax.config import Experiment

    fields = {f.name for f in dataclasses.fields(Experiment)}
    if not {"mesh", "dist"} <= fields:
        pytest.skip("Experiment has no mesh / dist fields yet")
    import tyro

    from grpo_jax.runner import load_experiment
    base = load_experiment(ROOT / "experiments" / "gsm8k_qwen25_15b.py")
    exp = tyro.cli(Experiment, default=base, prog="grpo-jax run",
                   config=(tyro.conf.FlagConversionOff, tyro.conf.AvoidSubcommands),
                   args=["--mesh.axes", "data", "1", "fsdp", "-1", "tensor", "1",
                         "--dist.coordinator_address", "10.0.0.1:1234",
                         "--dist.num_processes", "2", "--dist.process_id", "1"])
    assert exp.mesh.axes == (("data", 1), ("fsdp", -1), ("tensor", 1))
    assert (exp.dist.coordinator_address, exp.dist.num_processes, exp.dist.process_id) == \
        ("10.0.0.1:1234", 2, 1)
