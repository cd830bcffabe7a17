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
ARGS=(--master_port "${MASTER_PORT:-29500}")
[[ -n "${NUM_ACCELERATORS:-}" ]] && ARGS+=(--num_accelerators "$NUM_ACCELERATORS")
[[ -n "${HOSTFILE:-}" ]] && ARGS+=(--hostfile "$HOSTFILE")
[[ -n "${MASTER_ADDR:-}" ]] && ARGS+=(--master_addr "$MASTER_ADDR")
exec "${DEEPSPEED:-deepspeed}" "${ARGS[@]}" --module megaring.train "$@"
