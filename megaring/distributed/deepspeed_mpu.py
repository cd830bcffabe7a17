"""The mesh as DeepSpeed's ``mpu`` (Megatron's parallel-state interface), groups passed explicitly.

DeepSpeed reads three roles from an mpu:

- model parallel = ``tp``: replicated parameters count once in the gradient norm, tp-sharded ones
  (``param.tensor_model_parallel``) on every tp rank; checkpoint files are per tp rank.
- data parallel = ``dp``: DeepSpeed's batch accounting (``train_batch_size = micro * gas * dp``).
- sequence parallel = ``cp`` and sequence-data parallel = ``dp_cp``: DeepSpeed reduces gradients
  and shards ZeRO state over ``dp_cp``, the ranks that hold the same weights.

There is deliberately no ``initialize_sequence_parallel`` method: DeepSpeed takes its presence to
mean its own Ulysses state module and then ignores the data-parallel getters.
"""

from __future__ import annotations

import torch.distributed as dist

from megaring.distributed.mesh import Axis, ParallelMesh


def _group(axis: Axis) -> dist.ProcessGroup:
    """The axis's process group; a single-process axis maps to the (size-1) world group."""
    if axis.group is not None:
        return axis.group
    if axis.size != 1 or not dist.is_initialized() or dist.get_world_size() != 1:
        raise ValueError(f"axis {axis.name} of size {axis.size} has no process group")
    return dist.group.WORLD


class DeepSpeedMPU:
    """``get_{model,tensor_model,data,sequence,sequence_data}_parallel_{rank,world_size,group}``."""

    def __init__(self, mesh: ParallelMesh):
        self.mesh = mesh

    # model parallel (tp)
    def get_model_parallel_rank(self) -> int:
        return self.mesh.tp.rank

    def get_model_parallel_world_size(self) -> int:
        return self.mesh.tp.size

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return _group(self.mesh.tp)

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.mesh.tp.ranks[0]

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    # data parallel (dp): batch accounting
    def get_data_parallel_rank(self) -> int:
        return self.mesh.dp.rank

    def get_data_parallel_world_size(self) -> int:
        return self.mesh.dp.size

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return _group(self.mesh.dp)

    # sequence parallel (cp) and the ranks sharing the weights (dp_cp)
    def get_sequence_parallel_rank(self) -> int:
        return self.mesh.cp.rank

    def get_sequence_parallel_world_size(self) -> int:
        return self.mesh.cp.size

    def get_sequence_parallel_group(self) -> dist.ProcessGroup:
        return _group(self.mesh.cp)

    def get_sequence_data_parallel_rank(self) -> int:
        return self.mesh.dp_cp.rank

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.mesh.dp_cp.size

    def get_sequence_data_parallel_group(self) -> dist.ProcessGroup:
        return _group(self.mesh.dp_cp)

    # pipeline parallelism is not used
    def get_pipeline_model_parallel_rank(self) -> int:
        return 0

    def get_pipeline_model_parallel_world_size(self) -> int:
        return 1
