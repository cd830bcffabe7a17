#!/usr/bin/env bash
# Launch megaring-train with the DeepSpeed launcher.
#
#   launch/deepspeed.sh parallel.cp=4 parallel.dp=2 model=1b                  # all GPUs of this node
#   HOSTFILE=launch/hostfile.example launch/deepspeed.sh parallel.cp=8 ...   # several nodes over ssh
#   NUM_ACCELERATORS=2 launch/deepspeed.sh parallel.cp=2 model=tiny          # 2 CPU processes (gloo)
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
# The launcher logs pages of INFO (its command, world info, every spawn); warnings and errors only,
# unless DS_LOG_LEVEL=info.
ARGS=(--master_port "${MASTER_PORT:-29500}" --log_level "${DS_LOG_LEVEL:-warning}")
[[ -n "${NUM_ACCELERATORS:-}" ]] && ARGS+=(--num_accelerators "$NUM_ACCELERATORS")
[[ -n "${HOSTFILE:-}" ]] && ARGS+=(--hostfile "$HOSTFILE")
[[ -n "${MASTER_ADDR:-}" ]] && ARGS+=(--master_addr "$MASTER_ADDR")
exec "${DEEPSPEED:-deepspeed}" "${ARGS[@]}" --module megaring.train "$@"
