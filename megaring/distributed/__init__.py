"""Process mesh, launcher environment and DeepSpeed adapters."""

from megaring.distributed.init import init_distributed
from megaring.distributed.mesh import Axis, ParallelDims, ParallelMesh, build_mesh

__all__ = ["Axis", "ParallelDims", "ParallelMesh", "build_mesh", "init_distributed"]
