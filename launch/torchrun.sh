#!/usr/bin/env bash
# Launch megaring-train with torchrun on this node (or one node of a multi-node job).
#
#   NPROC=8 launch/torchrun.sh parallel.dp=2 parallel.cp=4 model=1b trainer.seq_len=131072
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node01 NPROC=8 launch/torchrun.sh ...   # on every node
#
# MASTER_ADDR is the first host's name or IP address; NODE_RANK 0 there, any other on the rest (under
# slurm: SLURM_NODEID). Before torchrun starts, this host checks that MASTER_ADDR resolves and, on the
# master host, that MASTER_PORT is free (exit 2 naming the problem), and says whether it starts the
# c10d store (megaring/distributed/rendezvous.py: torchrun's own guess fails for an IP address).
#
# Everything after the script name is a Hydra override for megaring-train.
set -euo pipefail
NPROC=${NPROC:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l) || echo 2)}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
# The project's interpreter (its .venv, made by make install) unless PYTHON says otherwise; its tools
# first on PATH, so that DeepSpeed builds its op with one ninja.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -x "$ROOT/.venv/bin/python" ]]; then export PATH="$ROOT/.venv/bin:$PATH"; fi
PYTHON=${PYTHON:-$(command -v python || command -v python3)}

# Preemption (docs/training.md, "When things go wrong"): TERM, INT (Ctrl-C) or USR1 to this script
# goes to the workers (torchrun's children, each in its own session), which agree on a step, save
# and exit 0 (trainer.preempt_exit_code); torchrun then exits 0 as after a finished run. torchrun
# itself ignores them (it would stop the workers and exit 1 however cleanly they saved), also when
# they reach it directly (slurm signals every process of a job step): it inherits them ignored and
# handles only TORCHELASTIC_SIGNALS_TO_HANDLE. torchrun reads that list from --signals-to-handle
# (default SIGTERM,SIGINT,SIGHUP,SIGQUIT) and overwrites the variable with it, so the option is
# passed. For the signals it does handle, the workers get TORCH_ELASTIC_SHUTDOWN_TIMEOUT s to save.
export TORCHELASTIC_SIGNALS_TO_HANDLE=${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGHUP,SIGQUIT}
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}
RDZV_CONF=$("$PYTHON" -c 'import sys; from megaring.distributed.rendezvous import main; sys.exit(main())' \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" --node-rank "$NODE_RANK") || exit 2
trap '' TERM INT USR1  # inherited by torchrun as ignored; the workers install their own handlers
"$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --nproc_per_node="$NPROC" --node_rank="$NODE_RANK" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${RDZV_ID:-megaring}" \
  --rdzv_conf="$RDZV_CONF" \
  --signals-to-handle="$TORCHELASTIC_SIGNALS_TO_HANDLE" \
  -m megaring.train "$@" &
TORCHRUN=$!
forward() { pkill "-$1" -P "$TORCHRUN" || true; }
trap 'forward TERM' TERM
trap 'forward INT' INT
trap 'forward USR1' USR1

# torchrun reaps its workers from a loop that also asks the rendezvous store for news. On a host cut
# off from the store (its link, or the master host's, down) that call never returns (torch 2.13 retries
# it; seen for minutes in tests/multinode/test_lost_host.py), so the workers, which have ended (exit 4,
# naming the lost host), stay zombies and torchrun never ends. Once every worker has ended, torchrun gets
# WORKERS_ENDED_GRACE_S (default 60) s to end by itself; then this script stops it and exits as torchrun
# would: 0 when every worker exited 0, else 1.
GRACE=${WORKERS_ENDED_GRACE_S:-60}
# The workers' worst exit status once every one of them has ended (zombies, /proc/<pid>/stat field 52:
# the waitpid status); fails while one runs, or when torchrun has none (not started yet, or reaped).
ended_workers_status() {
  local pid f worst=0 any="" code
  for pid in $(pgrep -P "$TORCHRUN"); do
    read -ra f <<<"$(cut -d')' -f2- "/proc/$pid/stat" 2>/dev/null)" || continue
    [[ ${f[0]:-} == Z ]] || return 1
    any=1
    code=$(( (f[49] >> 8) & 255 )); (( f[49] & 127 )) && code=$(( 128 + (f[49] & 127) ))
    (( code > worst )) && worst=$code
  done
  [[ -n $any ]] && echo "$worst"
}
ENDED=$(mktemp)
watch_workers() {
  local since="" status
  while sleep 1; do
    status=$(ended_workers_status) || { since=""; continue; }
    since=${since:-$SECONDS}
    if (( SECONDS - since >= GRACE )); then
      echo "$status" >"$ENDED"
      kill -KILL "$TORCHRUN" 2>/dev/null
      return
    fi
  done
}
watch_workers &
WATCHER=$!
# || true: under set -e a failed kill (the watcher already gone, e.g. slurm signalled the whole step)
# would turn this script's exit status into 1 after torchrun ended 0
trap 'kill "$WATCHER" 2>/dev/null || true; rm -f "$ENDED"' EXIT
while :; do
  wait "$TORCHRUN" && status=0 || status=$?
  kill -0 "$TORCHRUN" 2>/dev/null || break  # still running: a trap interrupted the wait
done
if [[ -s $ENDED ]]; then
  worst=$(<"$ENDED")
  echo "megaring: $(hostname): every worker ended (worst exit status $worst) and torchrun did not within" \
       "${GRACE} s (its rendezvous store $MASTER_ADDR:$MASTER_PORT unreachable?): stopped it" >&2
  (( worst == 0 )) && status=0 || status=1
fi
exit "$status"
