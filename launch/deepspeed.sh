#!/usr/bin/env bash
# Launch megaring-train with the DeepSpeed launcher.
#
#   launch/deepspeed.sh parallel.cp=4 parallel.dp=2 model=1b                  # all GPUs of this node
#   HOSTFILE=launch/hostfile.example MASTER_ADDR=node01 launch/deepspeed.sh parallel.cp=8 ...  # nodes over ssh
#   NUM_ACCELERATORS=2 launch/deepspeed.sh parallel.cp=2 model=tiny          # 2 CPU processes (gloo)
#
# With HOSTFILE (lines of `<host> slots=<processes>`, docs/training.md) the launcher reaches every host
# with pdsh over ssh, and every host must resolve its name here first: a host that does not would only
# fail inside pdsh, while the others wait out the rendezvous timeout. This script checks the file
# exists (the launcher would run on this host alone without it) and names every host that does not
# resolve (exit 2).
#
# The launcher passes --local_rank to every process; megaring-train accepts and ignores it
# (the rank comes from the environment the launcher also sets).
set -euo pipefail
# The project's .venv (made by make install) first on PATH, unless DEEPSPEED names a launcher.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -x "$ROOT/.venv/bin/deepspeed" ]]; then export PATH="$ROOT/.venv/bin:$PATH"; fi
if ! command -v "${DEEPSPEED:-deepspeed}" >/dev/null; then
  echo "launch/deepspeed.sh: no deepspeed launcher: run 'make install' (it creates .venv/) or set DEEPSPEED=<path>" >&2
  exit 2
fi
hostfile_problems() {
  if [[ ! -f "$1" ]]; then
    echo "launch/deepspeed.sh: HOSTFILE=$1 is not a file (lines of '<host> slots=<processes>')"
    return
  fi
  local host rest
  while read -r host rest; do
    [[ -z "$host" || "$host" == \#* ]] && continue
    getent ahostsv4 "$host" >/dev/null || echo "launch/deepspeed.sh: host $host of HOSTFILE=$1 does not resolve" \
      "on $(hostname): give its name as this host resolves it ('getent hosts $host'), or its IP address"
  done <"$1"
}
if [[ -n "${HOSTFILE:-}" ]]; then
  PROBLEMS=$(hostfile_problems "$HOSTFILE")
  if [[ -n "$PROBLEMS" ]]; then echo "$PROBLEMS" >&2; exit 2; fi
fi
# The launcher logs pages of INFO (its command, world info, every spawn); warnings and errors only,
# unless DS_LOG_LEVEL=info.
ARGS=(--master_port "${MASTER_PORT:-29500}" --log_level "${DS_LOG_LEVEL:-warning}")
[[ -n "${NUM_ACCELERATORS:-}" ]] && ARGS+=(--num_accelerators "$NUM_ACCELERATORS")
[[ -n "${HOSTFILE:-}" ]] && ARGS+=(--hostfile "$HOSTFILE")
[[ -n "${MASTER_ADDR:-}" ]] && ARGS+=(--master_addr "$MASTER_ADDR")
exec "${DEEPSPEED:-deepspeed}" "${ARGS[@]}" --module megaring.train "$@"
