"""Run grpo-jax on a Cloud TPU VM or pod slice, from a laptop with the gcloud CLI.

    python scripts/launch_tpu.py up --name grpo --zone us-west4-a --accelerator-type v5litepod-8 \\
        --spot -- grpo-jax run experiments/gsm8k_qwen25_15b.py --run-dir /mnt/runs/gsm8k15b
    python scripts/launch_tpu.py logs|stop|status|delete --name grpo --zone us-west4-a

`up` creates the VM (or reuses it: `describe` first), installs the code on every worker (a copy
of this checkout, or `--repo URL --ref REF`) in a Python 3.12 venv with `pip install -e '.[tpu]'`,
starts the same command on every worker, streams worker 0's log (process 0, the one that
prints) and restarts the run when it exits 75 (grpo-jax checkpointed on SIGTERM) or the VM was
preempted (a spot VM is deleted, recreated and reinstalled). A restarted run resumes from its
run directory's latest checkpoint, so that directory must outlive the VM and be shared by its
hosts. `--dry-run` prints every command, numbered, in order, and runs nothing.

How the run is kept: each worker starts the command detached (`setsid nohup`), writing
~/grpo-logs/run.log, its pid and, when it ends, its exit code. Streaming worker 0's log is a
separate ssh (`tail -F` until the run ends, then one line with the exit code), so a dropped
connection or a closed laptop never kills the run: `logs` attaches again. Every other worker's
output stays in its own run.log (`logs --worker 3`, or `logs --worker all` for the last lines of
each). Only the Python standard library is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

PREEMPTED_EXIT = 75  # grpo_jax.runner.PREEMPTED_EXIT: checkpointed after SIGTERM; rerun to resume
ROOT = Path(__file__).resolve().parents[1]

# Exclusions of the copied checkout (tar --exclude patterns): history, outputs, local envs.
EXCLUDES = (".git", "runs", ".venv", "venv", "__pycache__", "*.egg-info", ".pytest_cache",
            ".benchmarks", "build", "dist", "._*")
LOST_STATES = ("PREEMPTED", "TERMINATED")  # spot / preemptible VMs cannot restart: recreate
POLL_S = 30  # while the VM is CREATING, STARTING, REPAIRING...
POLLS = 40
REATTACH = 3  # consecutive log streams lost while the VM stays READY before giving up
STOP_WAIT_S = 120  # a leftover run gets this long to checkpoint after SIGTERM, then SIGKILL

_EXIT_RE = re.compile(r"^\[launch\] run exited with code (-?\d+)\s*$", re.M)
_NO_CODE = "[launch] run ended without an exit code"
_STOPPED = "[launch] stopped on request"
_NO_RUN = "[launch] no run was started"


class LaunchError(RuntimeError):
    """A step failed in a way a restart cannot fix (bad flags, no capacity, no gcloud...)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Spec:
    """Everything a launch needs. Paths on the workers are relative to the home directory."""

    name: str
    zone: str
    project: str | None = None
    accelerator_type: str = "v5litepod-8"
    version: str = "v2-alpha-tpuv5-lite"  # the runtime image: v5e; v2-alpha-tpuv6e for v6e
    spot: bool = False
    preemptible: bool = False
    repo: str | None = None  # git URL cloned on every worker; None: copy local_dir instead
    ref: str = "main"
    local_dir: str = "."
    remote_dir: str = "grpo_jax"
    venv: str = "grpo-venv"
    log_dir: str = "grpo-logs"
    python: str = "3.12"  # the images ship Python 3.10; uv installs this one (grpo_jax needs 3.11+)
    extra: str = "tpu"
    setup: str | None = None  # shell run on every worker at each install (mount the shared disk)
    env: tuple[tuple[str, str], ...] = ()
    command: tuple[str, ...] = ()
    max_restarts: int = 3
    restart_delay: float = 30.0

    def __post_init__(self):
        if not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", self.name):
            raise ValueError(f"--name {self.name!r}: lowercase letters, digits and '-', "
                             f"starting with a letter")
        for flag, path in (("--remote-dir", self.remote_dir), ("--venv", self.venv),
                           ("--log-dir", self.log_dir)):
            if not re.fullmatch(r"[A-Za-z0-9_.][A-Za-z0-9_./-]*", path) or ".." in path.split("/"):
                raise ValueError(f"{flag} {path!r}: a plain path relative to the workers' home "
                                 f"directory (letters, digits, '._-/', no '..')")
        for key, _ in self.env:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ValueError(f"--env {key!r}: not a variable name")
        if self.spot and self.preemptible:
            raise ValueError("--spot and --preemptible exclude each other")
        if self.max_restarts < 0:
            raise ValueError(f"--max-restarts {self.max_restarts}: must be >= 0")

    @property
    def multi_host(self) -> bool:
        """More than one worker VM: every TPU generation puts at most 8 cores/chips of a
        `<gen>-<n>` slice on one host, so n > 8 means a pod slice."""
        m = re.search(r"-(\d+)$", self.accelerator_type)
        return bool(m) and int(m.group(1)) > 8


@dataclasses.dataclass(frozen=True)
class Step:
    kind: str  # describe, create, delete, pack, copy, fetch, install, cleanup, start, stream...
    what: str
    argv: tuple[str, ...]
    capture: bool = False  # the executor returns stdout/stderr instead of showing them
    stream: bool = False  # shown as it comes and also returned (the run's log)

    def shell(self) -> str:
        return shlex.join(self.argv)


@dataclasses.dataclass(frozen=True)
class Result:
    rc: int
    out: str = ""
    err: str = ""


@dataclasses.dataclass(frozen=True)
class Outcome:
    """How the run on worker 0 ended: its exit code (None: it ended without one, e.g. the VM
    rebooted under it), and whether `stop` asked for it."""

    code: int | None
    stopped: bool = False


LOST, DETACHED = "lost", "detached"  # the VM went away / the log stream keeps dropping
Executor = Callable[[Step], Result]

# ----------------------------------------------------------------------------- commands (pure)


def gcloud(spec: Spec, verb: str, *args: str) -> tuple[str, ...]:
    """`gcloud compute tpus tpu-vm VERB ARG --zone=Z [--project=P] [--flags]`: the zone follows
    the positional arguments (the VM's name; scp's source and destination)."""
    n = next((i for i, a in enumerate(args) if a.startswith("--")), len(args))
    place = (f"--zone={spec.zone}",) + ((f"--project={spec.project}",) if spec.project else ())
    return ("gcloud", "compute", "tpus", "tpu-vm", verb, *args[:n], *place, *args[n:])


def ssh(spec: Spec, worker: str | int, script: str, kind: str, what: str, **kw) -> Step:
    return Step(kind, what, gcloud(spec, "ssh", spec.name, f"--worker={worker}",
                                   f"--command={script.strip()}"), **kw)


def describe_step(spec: Spec) -> Step:
    return Step("describe", f"is there a TPU VM {spec.name}? (its state; reused when READY)",
                gcloud(spec, "describe", spec.name, "--format=value(state)"), capture=True)


def create_step(spec: Spec) -> Step:
    argv = gcloud(spec, "create", spec.name, f"--accelerator-type={spec.accelerator_type}",
                  f"--version={spec.version}")
    argv += ("--spot",) * spec.spot + ("--preemptible",) * spec.preemptible
    kind = "spot " if spec.spot else "preemptible " if spec.preemptible else ""
    return Step("create", f"create the {kind}TPU VM {spec.name} ({spec.accelerator_type})", argv)


def delete_step(spec: Spec, yes: bool = True) -> Step:
    return Step("delete", f"delete the TPU VM {spec.name}",
                gcloud(spec, "delete", spec.name, *(("--quiet",) if yes else ())))


def start_vm_step(spec: Spec) -> Step:
    return Step("start-vm", f"start the stopped TPU VM {spec.name}",
                gcloud(spec, "start", spec.name))


def _alive(spec: Spec) -> str:
    """Shell: `alive` is true while this launcher's run is going on the worker (its pid is
    live and still our job script, not a pid reused after a reboot); sets $pid."""
    logs = spec.log_dir
    return (f'cd "$HOME"\nalive() {{ pid=$(cat {logs}/run.pid 2>/dev/null) && '
            f'ps -o args= -p "$pid" 2>/dev/null | grep -qF {logs}/job.sh; }}')


def tarball(spec: Spec) -> str:
    return os.path.join(tempfile.gettempdir(), f"grpo_jax-{spec.name}.tar.gz")


def install_steps(spec: Spec) -> list[Step]:
    """The code on every worker (the same version everywhere), then the venv and the install."""
    r, v = spec.remote_dir, spec.venv
    busy = (_alive(spec) + '\nif alive; then echo "[launch] $(hostname): a run is going (pid '
            '$pid): stop it (launch_tpu.py stop) before installing over it" >&2; exit 3; fi\nset -e')
    if spec.repo is None:
        archive = f"{r}-src.tar.gz"
        steps = [
            Step("pack", f"pack the local checkout {spec.local_dir} (without .git, runs/, venvs)",
                 ("tar", "-czf", tarball(spec), *(f"--exclude={x}" for x in EXCLUDES),
                  "-C", spec.local_dir, ".")),
            Step("copy", "copy it to every worker",
                 gcloud(spec, "scp", tarball(spec), f"{spec.name}:{archive}", "--worker=all")),
            ssh(spec, "all", busy + f"""
rm -rf {r}
mkdir -p {r}
tar -xzf {archive} -C {r}
sha256sum {archive} | cut -c1-12 > {r}/.source-version
""", "fetch", f"unpack it into ~/{r} on every worker (replacing the previous copy)"),
        ]
    else:
        steps = [ssh(spec, "all", busy + f"""
if [ ! -d {r}/.git ]; then rm -rf {r}; git clone -q {shlex.quote(spec.repo)} {r}; fi
git -C {r} fetch -q origin {shlex.quote(spec.ref)}
git -C {r} checkout -q --detach FETCH_HEAD
git -C {r} rev-parse --short HEAD > {r}/.source-version
""", "fetch", f"check out {spec.repo} at {spec.ref} into ~/{r} on every worker")]
    if spec.setup:
        steps.append(ssh(spec, "all", f'set -e\ncd "$HOME"\n{spec.setup}', "setup",
                         f"--setup on every worker: {spec.setup}"))
    steps.append(ssh(spec, "all", f"""
set -e
cd "$HOME"
mkdir -p {spec.log_dir}
export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv > /dev/null; then curl -LsSf https://astral.sh/uv/install.sh | sh; fi
if [ ! -x {v}/bin/python ]; then uv venv -q --seed --python {shlex.quote(spec.python)} {v}; fi
cd {r}
"$HOME"/{v}/bin/python -m pip install -q -e ".[{spec.extra}]"
versions=$("$HOME"/{v}/bin/python -c "import sys, jax; print(sys.version.split()[0], jax.__version__)")
echo "[launch] $(hostname): code $(cat .source-version), python and jax $versions"
""", "install", f"install on every worker: a Python {spec.python} venv ~/{v} (uv), "
                 f"pip install -e '.[{spec.extra}]'"))
    return steps


def job_script(spec: Spec) -> str:
    """What every worker runs, detached: the command in the venv, then its exit code to a file.
    The trap keeps this shell alive through SIGTERM so that it records grpo-jax's 75."""
    env = [("PYTHONUNBUFFERED", "1"),
           ("JAX_COMPILATION_CACHE_DIR", '"$HOME/.cache/jax-compilation"')]
    exports = " ".join(f"{k}={val}" for k, val in env + [(k, shlex.quote(v)) for k, v in spec.env])
    logs = spec.log_dir
    return f"""# written by scripts/launch_tpu.py; every worker runs it
trap true TERM INT
cd "$HOME" && . {spec.venv}/bin/activate && cd {spec.remote_dir} &&
export {exports} &&
{shlex.join(spec.command)}
rc=$?
cd "$HOME" && echo "$rc" > {logs}/exit_code.tmp && mv {logs}/exit_code.tmp {logs}/exit_code
exit "$rc"
"""


def cleanup_step(spec: Spec) -> Step:
    logs = spec.log_dir
    return ssh(spec, "all", _alive(spec) + f"""
if alive; then
  echo "[launch] $(hostname): stopping the previous run (pid $pid)"
  kill -TERM -- "-$pid"
  for i in $(seq {STOP_WAIT_S}); do alive || break; sleep 1; done
  if alive; then kill -KILL -- "-$pid"; fi
fi
rm -f {logs}/stop_requested
""", "cleanup", "stop what is left of the previous run on every worker (frees the TPU)")


def start_step(spec: Spec) -> Step:
    logs = spec.log_dir
    return ssh(spec, "all", _alive(spec) + f"""
mkdir -p {logs}
if alive; then
  echo "[launch] $(hostname): a run is still going (pid $pid): launch_tpu.py logs watches it" >&2
  exit 3
fi
rm -f {logs}/exit_code {logs}/stop_requested
if [ -f {logs}/run.log ]; then mv {logs}/run.log {logs}/run-$(date +%Y%m%d-%H%M%S)-$$.log; fi
cat > {logs}/job.sh << \\GRPO_JOB
{job_script(spec).strip()}
GRPO_JOB
setsid nohup bash {logs}/job.sh > {logs}/run.log 2>&1 < /dev/null &
echo $! > {logs}/run.pid
echo "[launch] $(hostname): started (pid $!, log ~/{logs}/run.log)"
""", "start", f"start on every worker, detached: {shlex.join(spec.command)}")


def stream_step(spec: Spec, worker: int | str = 0, lines: str = "+1") -> Step:
    """Follow a worker's run.log until the run ends, then print its exit code."""
    logs = spec.log_dir
    return ssh(spec, worker, _alive(spec) + f"""
if [ ! -f {logs}/run.log ]; then echo "{_NO_RUN} on $(hostname)" >&2; exit 3; fi
if alive; then
  tail -n {lines} -s 0.5 --pid="$pid" -F {logs}/run.log
  for i in $(seq 20); do [ -f {logs}/exit_code ] && break; sleep 0.5; done
else
  tail -n {lines} {logs}/run.log
fi
if [ -f {logs}/stop_requested ]; then echo "{_STOPPED}"; fi
if [ -f {logs}/exit_code ]; then echo "[launch] run exited with code $(cat {logs}/exit_code)"
else echo "{_NO_CODE}"; fi
""", "stream", f"stream worker {worker}'s log (process {worker}) until the run ends",
               stream=True)


def tail_all_step(spec: Spec, lines: int = 30) -> Step:
    return ssh(spec, "all", f"""
cd "$HOME"
tail -n {lines} {spec.log_dir}/run.log 2>&1 | sed "s/^/[$(hostname)] /"
""", "logs", f"the last {lines} lines of every worker's log")


def stop_step(spec: Spec) -> Step:
    logs = spec.log_dir
    return ssh(spec, "all", _alive(spec) + f"""
if alive; then
  touch {logs}/stop_requested
  kill -TERM -- "-$pid"
  echo "[launch] $(hostname): SIGTERM sent to the run (pid $pid): checkpoint, exit {PREEMPTED_EXIT}"
else
  echo "[launch] $(hostname): no run is going"
fi
""", "stop", "SIGTERM to the run on every worker: checkpoint, exit, no restart")


def status_step(spec: Spec) -> Step:
    logs = spec.log_dir
    return ssh(spec, "all", _alive(spec) + f"""
if alive; then s="running (pid $pid)"
elif [ -f {logs}/exit_code ]; then s="exited with code $(cat {logs}/exit_code)"
else s="no run"; fi
version=$(cat {spec.remote_dir}/.source-version 2>/dev/null || echo none)
echo "[launch] $(hostname): $s; code $version"
""", "status", "the run's state and the code version on every worker")


def recovery_steps(spec: Spec) -> list[Step]:
    """The commands of one restart after a preemption, for the dry run's plan."""
    return ([describe_step(spec), delete_step(spec), create_step(spec), *install_steps(spec),
             cleanup_step(spec), start_step(spec), stream_step(spec)])


# ----------------------------------------------------------------------------- control


def must(ex: Executor, step: Step) -> Result:
    res = ex(step)
    if res.rc != 0:
        raise LaunchError(f"failed ({res.rc}): {step.what}\n  {step.shell()[:300]}"
                          + (f"\n{res.err.strip()}" if res.err.strip() else ""))
    return res


def vm_state(spec: Spec, ex: Executor) -> str | None:
    """READY, PREEMPTED, CREATING...; None when there is no such VM."""
    res = ex(describe_step(spec))
    if res.rc == 0:
        return res.out.strip() or "UNKNOWN"
    if "NOT_FOUND" in res.err or "not found" in res.err.lower():
        return None
    raise LaunchError(f"gcloud describe failed ({res.rc}):\n{res.err.strip()}")


def ensure_vm(spec: Spec, ex: Executor, sleep=time.sleep, say=print) -> bool:
    """Make the VM READY; True when it was (re)created, so that its disk is empty."""
    for _ in range(POLLS):
        state = vm_state(spec, ex)
        if state == "READY":
            return False
        if state is None:
            must(ex, create_step(spec))
            return True
        if state in LOST_STATES:
            say(f"{spec.name} is {state}: deleting and recreating it")
            must(ex, delete_step(spec))
            must(ex, create_step(spec))
            return True
        if state == "STOPPED":
            must(ex, start_vm_step(spec))
            return False
        say(f"{spec.name} is {state}: checking again in {POLL_S}s")
        sleep(POLL_S)
    raise LaunchError(f"{spec.name} did not become READY in {POLLS * POLL_S}s")


def install(spec: Spec, ex: Executor) -> None:
    for step in install_steps(spec):
        must(ex, step)


def parse_outcome(text: str) -> Outcome | None:
    """The last lines of a stream: how the run ended, or None if the stream broke first."""
    stopped = _STOPPED in text
    codes = _EXIT_RE.findall(text)
    if codes:
        return Outcome(int(codes[-1]), stopped)
    if _NO_CODE in text:
        return Outcome(None, stopped)
    return None


def attach(spec: Spec, ex: Executor, sleep=time.sleep, say=print, lines: str = "+1"):
    """Stream worker 0's log until the run ends: an `Outcome`, LOST (the VM is gone or not
    READY) or DETACHED (the stream kept dropping while the VM and, presumably, the run are fine)."""
    for _ in range(REATTACH + 1):
        res = ex(stream_step(spec, 0, lines))
        if _NO_RUN in res.out + res.err:
            raise LaunchError(f"no run was started on {spec.name}: use 'up' or 'run'")
        outcome = parse_outcome(res.out)
        if outcome is not None:
            return outcome
        if vm_state(spec, ex) != "READY":
            return LOST
        say("the log stream broke but the VM is READY: attaching again")
        sleep(10)
        lines = "20"
    return DETACHED


def run_loop(spec: Spec, ex: Executor, sleep=time.sleep, say=print) -> int:
    """Start the run on every worker, stream it, restart it on exit 75 or a lost VM (at most
    `max_restarts` times); returns the run's exit code."""
    restarts, restart = 0, False
    while True:
        outcome: Outcome | str = LOST
        if restart and ensure_vm(spec, ex, sleep, say):
            install(spec, ex)  # a recreated VM has an empty disk
        started = True
        for step in ([cleanup_step(spec)] if restart else []) + [start_step(spec)]:
            if ex(step).rc != 0:
                if not restart:
                    raise LaunchError(f"failed: {step.what}")
                started = False  # e.g. the VM went down under us: recover below
                break
        if started:
            outcome = attach(spec, ex, sleep, say)
        if outcome == DETACHED:
            say(f"lost the log stream {REATTACH + 1} times; the run goes on. Attach again with "
                f"'launch_tpu.py logs', stop it with 'launch_tpu.py stop'")
            return 1
        code = outcome.code if isinstance(outcome, Outcome) else None
        if isinstance(outcome, Outcome):
            if outcome.stopped:
                say(f"stopped on request (exit {code}); rerun the same command to resume")
                return code if code is not None else PREEMPTED_EXIT
            if code == 0:
                say("the run finished (exit 0)")
                return 0
            if code is not None and code != PREEMPTED_EXIT:
                ex(tail_all_step(spec))
                ex(cleanup_step(spec))  # the other processes may wait in a collective for ever
                say(f"the run exited with code {code}: not restarted (only exit {PREEMPTED_EXIT}, "
                    f"a checkpoint after SIGTERM, and a lost VM are); every worker's last lines "
                    f"are above")
                return code
        why = ("the VM went away" if outcome == LOST else
               "the run ended without an exit code" if code is None else
               f"the run exited {PREEMPTED_EXIT} (checkpointed after SIGTERM)")
        if restarts >= spec.max_restarts:
            say(f"{why}; no restarts left (--max-restarts {spec.max_restarts})")
            return code if code is not None else 1
        restarts += 1
        say(f"{why}: restart {restarts}/{spec.max_restarts} in {spec.restart_delay:g}s; it "
            f"resumes from the run directory's latest checkpoint")
        sleep(spec.restart_delay)
        restart = True


def up(spec: Spec, ex: Executor, sleep=time.sleep, say=print, reinstall: bool = True) -> int:
    if ensure_vm(spec, ex, sleep, say) or reinstall:
        install(spec, ex)
    return run_loop(spec, ex, sleep, say)


# ----------------------------------------------------------------------------- executors


class DryRun:
    """Prints each step, numbered, and answers as if all went well on a VM that did not exist."""

    def __init__(self, out=None):
        self.n, self.out, self.seen = 0, out or sys.stdout, {}

    def __call__(self, step: Step) -> Result:
        self.n += 1
        self.seen.setdefault(step.shell(), self.n)
        print(f"\n[{self.n}] {step.what}\n{step.shell()}", file=self.out)
        if step.kind == "describe":
            print("# (dry run: taken as NOT_FOUND; a READY VM is reused, a PREEMPTED one is "
                  "deleted and recreated)", file=self.out)
            return Result(1, "", "NOT_FOUND (dry run)")
        if step.kind == "stream":
            print("# (dry run: the run is taken to finish with exit 0)", file=self.out)
            return Result(0, "[launch] run exited with code 0\n")
        return Result(0)

    def restart_plan(self, spec: Spec) -> None:
        """The commands of one restart, numbered R1...; those printed above are referred to."""
        print(f"\n# If the run exits {PREEMPTED_EXIT} (checkpointed after SIGTERM), ends without "
              f"an exit code, or the VM goes away: after --restart-delay "
              f"{spec.restart_delay:g}s, at most --max-restarts {spec.max_restarts} times:",
              file=self.out)
        steps = recovery_steps(spec)
        go_on = 1 + next(i for i, st in enumerate(steps) if st.kind == "cleanup")
        notes = {"describe": f"; READY: on with [R{go_on}]",
                 "delete": "; only when PREEMPTED or TERMINATED, then the steps below"}
        for i, step in enumerate(steps, 1):
            seen = self.seen.get(step.shell())
            tail = f": as [{seen}]" if seen else ""
            print(f"[R{i}] {step.what}{tail}{notes.get(step.kind, '')}", file=self.out)
            if not seen:
                print(step.shell(), file=self.out)


class Shell:
    """Runs each step; `verbose` also prints its full command line."""

    def __init__(self, verbose: bool = False):
        self.verbose = verbose

    def __call__(self, step: Step) -> Result:
        print(f"[launch] {step.what}" + (f"\n  $ {step.shell()}" if self.verbose else ""),
              flush=True)
        try:
            if step.capture:
                p = subprocess.run(step.argv, capture_output=True, text=True)
                return Result(p.returncode, p.stdout, p.stderr)
            if not step.stream:
                return Result(subprocess.run(step.argv).returncode)
            p = subprocess.Popen(step.argv, stdout=subprocess.PIPE)
            kept = b""
            while chunk := p.stdout.read1(1 << 16):  # as it comes: tqdm bars end in \r, not \n
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                kept = (kept + chunk)[-(1 << 16):]
            return Result(p.wait(), kept.decode(errors="replace"))
        except FileNotFoundError as e:
            raise LaunchError(f"{step.argv[0]}: not found ({e}); install the Google Cloud CLI "
                              f"and run 'gcloud auth login'") from None


# ----------------------------------------------------------------------------- command line

COMMANDS = {
    "up": "create or reuse the VM, install, run on every worker, stream, restart (the main one)",
    "create": "create the VM unless it exists",
    "install": "copy or clone the code to every worker and install it",
    "run": "run on every worker, stream worker 0, restart after preemption (no install first)",
    "logs": "stream a worker's log until the run ends (--worker N), or every worker's last lines",
    "stop": "SIGTERM the run on every worker: it checkpoints and exits 75; no restart",
    "status": "the run's state and the code version on every worker",
    "delete": "delete the VM",
}


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="the TPU VM's name")
    common.add_argument("--zone", required=True,
                        help="e.g. us-west4-a (a zone that has the accelerator type)")
    common.add_argument("--project", help="the GCP project (default: gcloud's configured one)")
    common.add_argument("--dry-run", action="store_true",
                        help="print every command, numbered, in order; run nothing")
    common.add_argument("-v", "--verbose", action="store_true",
                        help="print each command as it runs")
    vm = argparse.ArgumentParser(add_help=False)
    vm.add_argument("--accelerator-type", default=Spec.accelerator_type,
                    help="v5litepod-8 (one host), v5litepod-16 (several hosts), v6e-8, v4-32...")
    vm.add_argument("--version", default=Spec.version,
                    help="TPU runtime image: v2-alpha-tpuv5-lite (v5e), v2-alpha-tpuv6e (v6e), "
                         "tpu-ubuntu2204-base (v4), v2-alpha-tpuv5 (v5p)")
    kind = vm.add_mutually_exclusive_group()
    kind.add_argument("--spot", action="store_true", help="a spot VM: cheap, preemptible")
    kind.add_argument("--preemptible", action="store_true", help="a preemptible VM (time-limited)")
    paths = argparse.ArgumentParser(add_help=False)
    paths.add_argument("--remote-dir", default=Spec.remote_dir, help="the code, on every worker")
    paths.add_argument("--venv", default=Spec.venv)
    paths.add_argument("--log-dir", default=Spec.log_dir)
    code = argparse.ArgumentParser(add_help=False)
    code.add_argument("--repo", help="git URL to clone on every worker (default: copy the local "
                                     "checkout, uncommitted changes included)")
    code.add_argument("--ref", default=Spec.ref, help="branch, tag or full commit of --repo")
    code.add_argument("--local-dir", default=None, help="the checkout to copy (default: this one)")
    code.add_argument("--python", default=Spec.python)
    code.add_argument("--extra", default=Spec.extra, help="pip extra (tpu)")
    code.add_argument("--setup", metavar="SHELL",
                      help="shell run on every worker at each install (again on a recreated VM), "
                           "e.g. mounting the shared run directory; make it idempotent")
    job = argparse.ArgumentParser(add_help=False)
    job.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                     help="environment of the run on every worker (repeat); shown by --dry-run")
    job.add_argument("--max-restarts", type=int, default=Spec.max_restarts)
    job.add_argument("--restart-delay", type=float, default=Spec.restart_delay,
                     help="seconds before a restart (a preempted VM needs a moment to go down)")
    job.add_argument("--skip-install", action="store_true",
                     help="up: do not reinstall on a VM that exists (a new VM is installed anyway)")

    ap = argparse.ArgumentParser(
        prog="python scripts/launch_tpu.py", description=__doc__.split("\n\n")[0],
        epilog="The run's command follows '--', e.g. -- grpo-jax run experiments/NAME.py "
               "--run-dir DIR. Walkthrough: docs/launch.md.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    parents = {"up": [common, vm, paths, code, job], "create": [common, vm],
               "install": [common, paths, code], "run": [common, vm, paths, code, job],
               "logs": [common, paths], "stop": [common, paths], "status": [common, paths],
               "delete": [common]}
    for name, text in COMMANDS.items():
        p = sub.add_parser(name, parents=parents[name], help=text, description=text)
        if name == "logs":
            p.add_argument("--worker", default="0", help="a worker index, or 'all'")
            p.add_argument("--lines", type=int, default=30, help="with --worker all")
        if name == "delete":
            p.add_argument("--yes", action="store_true", help="no confirmation prompt")
    return ap


def check_command(spec: Spec) -> None:
    """A grpo-jax run must name its run directory, or a restart would not resume it."""
    cmd = list(spec.command)
    if not cmd:
        raise ValueError("give the command to run after '--', e.g. -- grpo-jax run "
                         "experiments/NAME.py --run-dir DIR")
    if cmd[:2] != ["grpo-jax", "run"]:
        return
    run_dir = next((a.split("=", 1)[1] if "=" in a else (cmd[i + 1] if i + 1 < len(cmd) else "")
                    for i, a in enumerate(cmd) if a.split("=")[0] in ("--run-dir", "--run_dir")),
                   None)
    if not run_dir:
        raise ValueError("grpo-jax run needs --run-dir: a restart resumes from that directory "
                         "(without it every attempt starts a new run under runs/)")
    if not run_dir.startswith(("/", "gs://")):
        print(f"launch_tpu.py: warning: --run-dir {run_dir} is on each worker's boot disk: lost "
              f"when a spot VM is recreated" + (", and not shared by the hosts of this pod slice "
                                                "(checkpoints need a shared path)"
                                                if spec.multi_host else ""), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_args(argv)
    names = {f.name for f in dataclasses.fields(Spec)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if args.cmd in ("up", "install", "run"):
        if values.get("local_dir") is None:
            rel = os.path.relpath(ROOT)
            values["local_dir"] = rel if not rel.startswith("..") else str(ROOT)
    else:
        values.pop("local_dir", None)
    if "env" in values:
        bad = [e for e in values["env"] if "=" not in e]
        if bad:
            print(f"--env {bad[0]!r}: expected KEY=VALUE", file=sys.stderr)
            return 2
        values["env"] = tuple(tuple(e.split("=", 1)) for e in values["env"])
    try:
        spec = Spec(**values, command=tuple(command))
        if args.cmd in ("up", "run"):
            check_command(spec)
        elif command:
            raise ValueError(f"{args.cmd} takes no command after '--'")
    except ValueError as e:
        print(f"launch_tpu.py: {e}", file=sys.stderr)
        return 2

    ex: Executor = DryRun() if args.dry_run else Shell(args.verbose)
    say = (lambda msg: None) if args.dry_run else (
        lambda msg: print(f"[launch] {msg}", flush=True))
    sleep = (lambda s: None) if args.dry_run else time.sleep
    if args.dry_run:
        print(f"# dry run of '{args.cmd}': nothing is executed; the commands, in order:")
    try:
        if args.cmd == "up":
            rc = up(spec, ex, sleep, say, reinstall=not args.skip_install)
        elif args.cmd == "run":
            rc = run_loop(spec, ex, sleep, say)
        elif args.cmd == "create":
            ensure_vm(spec, ex, sleep, say)
            rc = 0
        elif args.cmd == "install":
            install(spec, ex)
            rc = 0
        elif args.cmd == "logs":
            if args.worker != "all" and not args.worker.isdigit():
                raise LaunchError(f"--worker {args.worker!r}: a worker index or 'all'")
            if args.worker == "all":
                rc = ex(tail_all_step(spec, args.lines)).rc
            else:
                rc = ex(stream_step(spec, int(args.worker))).rc
        else:
            step = {"stop": stop_step, "status": status_step,
                    "delete": lambda s: delete_step(s, yes=args.yes)}[args.cmd](spec)
            rc = ex(step).rc
    except LaunchError as e:
        print(f"[launch] error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if args.cmd in ("up", "run", "logs"):
            print("\n[launch] interrupted; a run that was started goes on on the VM: 'logs' "
                  "attaches again, 'stop' stops it", file=sys.stderr)
        return 130
    if args.dry_run and args.cmd in ("up", "run"):
        ex.restart_plan(spec)
    return rc


if __name__ == "__main__":
    sys.exit(main())
