#!/usr/bin/env bash
# Launch megaring-train with torchrun on this node (or one node of a multi-node job).
#
#   NPROC=8 launch/torchrun.sh parallel.dp=2 parallel.cp=4 model=1b trainer.seq_len=131072
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node01 NPROC=8 launch/torchrun.sh ...   # on every node
#
# Everything after the script name is a Hydra override for megaring-train.
set -euo pipefail
NPROC=${NPROC:-$( (command -v nvidia-smi >/dev/null && nvidia-smi -L | wc -l) || echo 2)}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
# The project's interpreter (its .venv, made by make install) unless PYTHON says otherwise; its tools
# first on PATH, so that DeepSpeed builds its op with one ninja.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -x "$ROOT/.venv/bin/python" ]]; then export PATH="$ROOT/.venv/bin:$PATH"; fi
PYTHON=${PYTHON:-$(command -v python || command -v python3)}

exec "$PYTHON" -m torch.distributed.run \
  --nnodes="$NNODES" --nproc_per_node="$NPROC" --node_rank="$NODE_RANK" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${RDZV_ID:-megaring}" \
  -m megaring.train "$@"
