#!/usr/bin/env bash
# Run grpo-jax on NVIDIA GPUs: one GPU, all GPUs of one host, or several hosts; a run that exits
# 75 (grpo-jax checkpointed after SIGTERM) is started again and resumes from its --run-dir.
#
#   bash scripts/run_gpu.sh [options] -- grpo-jax run experiments/NAME.py --run-dir DIR [overrides]
#
#   --dry-run                 print the commands, numbered, and run nothing
#   --install EXTRA           first: pip install -e ".[EXTRA]"; cuda (CUDA 12) or cuda13
#   --gpus LIST               CUDA_VISIBLE_DEVICES, e.g. 0 or 0,1 (default: every GPU)
#   --coordinator HOST:PORT   several hosts, without SLURM: run this on every host with the same
#   --num-processes N         coordinator (host of process 0, any free port) and N, and
#   --process-id I            I = 0 .. N-1; they become --dist.* flags of grpo-jax run
#   --slurm                   inside an sbatch allocation: srun one process per node
#   --max-restarts N          restarts after exit 75 (default 3; 0 = none)
#   --log FILE                also append the output to FILE
#
# One process drives every GPU it sees: the mesh spans them (--mesh.axes data -1 fsdp 1 tensor 1
# splits the batch over all of them). Several hosts run one process each and the mesh spans every
# GPU of every host; the run directory must then be on a filesystem all hosts share.
# A SIGTERM or Ctrl-C sent to this script stops the run (it checkpoints) without a restart.
# The command runs in the checkout's root directory: relative paths are relative to it.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
DRY=0 EXTRA="" GPUS="" COORD="" NPROC="" PID_="" SLURM=0 MAX_RESTARTS=3 LOG=""
usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case "$1" in --install|--gpus|--coordinator|--num-processes|--process-id|--max-restarts|--log)
    [ $# -ge 2 ] || { echo "run_gpu.sh: $1 needs a value" >&2; exit 2; } ;;
  esac
  case "$1" in
    --dry-run) DRY=1 ;;
    --install) EXTRA=$2; shift ;;
    --gpus) GPUS=$2; shift ;;
    --coordinator) COORD=$2; shift ;;
    --num-processes) NPROC=$2; shift ;;
    --process-id) PID_=$2; shift ;;
    --slurm) SLURM=1 ;;
    --max-restarts) MAX_RESTARTS=$2; shift ;;
    --log) LOG=$2; shift ;;
    -h|--help) usage 0 ;;
    --) shift; break ;;
    *) echo "run_gpu.sh: unknown option $1 (the command goes after --)" >&2; usage 2 ;;
  esac
  shift
done
[ $# -gt 0 ] || { echo "run_gpu.sh: no command after --" >&2; usage 2; }
CMD=("$@")
case "$EXTRA" in ""|cuda|cuda13) ;; *) echo "run_gpu.sh: --install cuda or cuda13, got $EXTRA" >&2; exit 2 ;; esac
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || { echo "run_gpu.sh: --max-restarts $MAX_RESTARTS: not a count" >&2; exit 2; }
if [ -n "$COORD$NPROC$PID_" ]; then
  if [ -z "$COORD" ] || [ -z "$NPROC" ] || [ -z "$PID_" ]; then
    echo "run_gpu.sh: --coordinator, --num-processes and --process-id go together" >&2; exit 2
  fi
  [ "$SLURM" -eq 0 ] || { echo "run_gpu.sh: --slurm finds the coordinator itself" >&2; exit 2; }
  CMD+=(--dist.coordinator_address "$COORD" --dist.num_processes "$NPROC" --dist.process_id "$PID_")
fi
if [ "${CMD[0]}" = grpo-jax ] && [ "${CMD[1]:-}" = run ] && [[ " ${CMD[*]} " != *" --run-dir "* ]] \
   && [[ " ${CMD[*]} " != *" --run_dir "* ]] && [[ "${CMD[*]}" != *--run-dir=* ]]; then
  echo "run_gpu.sh: warning: no --run-dir: a restart after exit 75 would start a new run" >&2
fi

# The environment, set only where the caller has not set it.
# XLA preallocates this fraction of each GPU's memory at start (JAX's default: 0.75). One
# process owns the GPU here, so give it more room for the policy, the reference, the optimizer
# state and the rollout's KV cache; lower it, or set XLA_PYTHON_CLIENT_PREALLOCATE=false, when
# the GPU is shared with another process.
ENV=(XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
     # compiled programs are cached on disk: a restart after exit 75 skips most compilation
     JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/jax-compilation}"
     PYTHONUNBUFFERED=1)
[ -z "$GPUS" ] || ENV+=(CUDA_VISIBLE_DEVICES="$GPUS")
if [ "$SLURM" -eq 1 ]; then
  # jax.distributed.initialize() reads the coordinator, the process count and id from SLURM, but
  # then gives each process one GPU (SLURM_LOCALID); with one process per node, name them all.
  G=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
  if [ -n "${JAX_LOCAL_DEVICE_IDS:-}" ]; then IDS=$JAX_LOCAL_DEVICE_IDS
  elif [ "${G:-0}" -gt 0 ]; then IDS=$(seq -s, 0 $((G - 1)))
  elif [ "$DRY" -eq 1 ]; then IDS="0,1,...,G-1"
  else echo "run_gpu.sh: cannot count this node's GPUs; set JAX_LOCAL_DEVICE_IDS=0,1,..." >&2; exit 2; fi
  ENV+=(JAX_LOCAL_DEVICE_IDS="$IDS")
  # --kill-on-bad-exit: one crashed process ends the others instead of leaving them waiting in a
  # collective until the heartbeat timeout
  CMD=(srun --nodes="${SLURM_JOB_NUM_NODES:-1}" --ntasks-per-node=1 --kill-on-bad-exit=1 "${CMD[@]}")
fi

q() {  # one word, quoted only when the shell needs it
  if [[ $1 =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$1"
  else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
show() { local out="" w; for w in "$@"; do out+="$(q "$w") "; done; printf '%s\n' "${out% }"; }

if [ "$DRY" -eq 1 ]; then
  echo "# dry run: nothing is executed; the commands, in order:"
  n=0
  if [ -n "$EXTRA" ]; then n=$((n + 1)); echo "[$n] $(show "$PY" -m pip install -e ".[$EXTRA]")"; fi
  n=$((n + 1)); echo "[$n] export $(show "${ENV[@]}")"
  n=$((n + 1)); echo "[$n] $(show "${CMD[@]}")${LOG:+ 2>&1 | tee -a $(q "$LOG")}"
  echo "# exit 75: [$n] again, at most $MAX_RESTARTS times; any other exit code ends here"
  exit 0
fi

if [ -n "$EXTRA" ]; then "$PY" -m pip install -e ".[$EXTRA]" || exit $?; fi
export "${ENV[@]}"
STOPPING=0 CHILD=""
# Ctrl-C or a SIGTERM to this script: the run gets SIGTERM (it checkpoints, exits 75), no restart.
# (A background command starts with SIGINT ignored, so Ctrl-C is passed on as SIGTERM.)
trap 'STOPPING=1; [ -z "$CHILD" ] || kill -TERM "$CHILD" 2>/dev/null' INT TERM
restarts=0
while :; do
  echo "[run_gpu] $(show "${CMD[@]}")"
  if [ -n "$LOG" ]; then "${CMD[@]}" > >(tee -a "$LOG") 2>&1 & else "${CMD[@]}" & fi
  CHILD=$!
  wait "$CHILD"; rc=$?
  while kill -0 "$CHILD" 2>/dev/null; do wait "$CHILD"; rc=$?; done  # woken by a trap: wait on
  CHILD=""
  if [ "$rc" -ne 75 ] || [ "$STOPPING" -eq 1 ]; then exit "$rc"; fi
  if [ "$restarts" -ge "$MAX_RESTARTS" ]; then
    echo "[run_gpu] exit 75 and no restarts left (--max-restarts $MAX_RESTARTS)" >&2; exit 75
  fi
  restarts=$((restarts + 1))
  echo "[run_gpu] exit 75 (checkpointed after SIGTERM): restart $restarts/$MAX_RESTARTS, resuming" >&2
done
