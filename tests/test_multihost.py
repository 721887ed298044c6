"""Multi-host: a 2-process run (two local processes, gloo CPU collectives, coordinator on
127.0.0.1) produces the metrics of a 1-process run over the same global mesh of 4 devices, and
the processes stop together when only one of them gets the signal."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from test_reliability import EXPERIMENT_FILE, TIMING

EXP = (EXPERIMENT_FILE.replace("steps=6", "steps=2").replace("mu=2", "mu=1")
       .replace("checkpoint=CheckpointConfig(every=2, keep=2)", "checkpoint=CheckpointConfig(keep=1)"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cmd(exp_file, run_dir, *extra):
    return [sys.executable, "-m", "grpo_jax.cli", "run", str(exp_file), "--run-dir", str(run_dir),
            "--log.progress", "False", *extra]


def _env(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.endswith(TIMING)}
            for line in path.read_text().splitlines()]


def test_two_processes_equal_one_process_over_the_same_mesh(tmp_path):
    exp_file = tmp_path / "exp.py"
    exp_file.write_text(EXP)
    one = subprocess.run(_cmd(exp_file, tmp_path / "one"), env=_env(4), capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1} over 4 devices in 1 process(es)" in one.stdout

    port = _free_port()
    procs = [subprocess.Popen(_cmd(exp_file, tmp_path / "two", "--dist.coordinator_address",
                                   f"127.0.0.1:{port}", "--dist.num_processes", "2",
                                   "--dist.process_id", str(i)),
                              env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "over 4 devices in 2 process(es)" in outs[0]
    assert "[grpo-jax]" not in outs[1]  # only process 0 speaks and writes logs

    a, b = _rows(tmp_path / "one" / "metrics.jsonl"), _rows(tmp_path / "two" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in ra:  # rewards, lengths and counts exactly; device reductions to float32 rounding
            if isinstance(ra[k], float) and k not in ("reward", "reward_std", "response_length"):
                np.testing.assert_allclose(ra[k], rb[k], rtol=1e-5, atol=1e-7, err_msg=k)
            else:
                assert ra[k] == rb[k], k
    assert _rows(tmp_path / "one" / "eval.jsonl") == _rows(tmp_path / "two" / "eval.jsonl")


_OPEN_RUN_DIR = """
import dataclasses, sys
from grpo_jax.runner import make_run_dir
ns = {}
exec(open(sys.argv[1]).read(), ns)
exp = dataclasses.replace(ns["CONFIG"], run_dir=sys.argv[2])
for _ in range(300):
    make_run_dir(exp, "x")
"""


def test_processes_opening_one_run_directory_at_once_do_not_trip_over_each_other(tmp_path):
    """Every process of a multi-host run checks that the shared run directory is writable; two
    of them checking at the same moment must not delete each other's probe file (that crashed
    process 1 and left process 0 waiting for it at backend start), nor rename each other's
    temporary file (here both are process 0 and write config.json)."""
    exp_file = tmp_path / "exp.py"
    exp_file.write_text(EXP)
    procs = [subprocess.Popen([sys.executable, "-c", _OPEN_RUN_DIR, str(exp_file), str(tmp_path / "run")],
                              env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    for p in procs:
        out = p.communicate(timeout=300)[0]
        assert p.returncode == 0, out[-3000:]
    assert sorted(x.name for x in (tmp_path / "run").iterdir()) == ["config.json"]


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    """A stop signal that reaches one process only (one host's maintenance event, Ctrl-C in one
    terminal): the processes agree at the next step boundary, both checkpoint that step and exit
    75 (before, process 1 waited in the checkpoint's barrier while process 0 waited in the next
    update's collectives), and the resumed pair finishes the run with each step logged once."""
    import signal

    from test_reliability import PACED_EXPERIMENT_FILE

    exp_file = tmp_path / "exp.py"
    exp_file.write_text(PACED_EXPERIMENT_FILE.replace("mu=2", "mu=1"))
    run_dir, port = tmp_path / "two", _free_port()

    def start(port):
        return [subprocess.Popen(_cmd(exp_file, run_dir, "--dist.coordinator_address",
                                      f"127.0.0.1:{port}", "--dist.num_processes", "2",
                                      "--dist.process_id", str(i)),
                                 env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True) for i in range(2)]

    procs = start(port)
    metrics = run_dir / "metrics.jsonl"
    t0 = time.time()
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 2:
        assert all(p.poll() is None for p in procs), procs[0].stdout.read()[-3000:]
        assert time.time() - t0 < 300, "timed out waiting for two steps"
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=240)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise AssertionError("the processes did not stop together (hung)")
    assert [p.returncode for p in procs] == [75, 75], outs[0][-3000:] + outs[1][-3000:]
    stopped = int(outs[0].split("checkpointed at step ")[1].split(";")[0])
    assert 2 <= stopped < 8
    procs = start(_free_port())
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert [r["step"] for r in _rows(metrics)] == list(range(1, 9))
