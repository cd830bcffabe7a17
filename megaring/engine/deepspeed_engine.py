"""The DeepSpeed engine: ZeRO 0-3 over ``dp_cp``, the mesh as mpu, our optimizer and schedule.

With :mod:`megaring.engine.deepspeed_internals` (every use of a DeepSpeed internal) the only
module that imports DeepSpeed. Batch accounting counts dp only
(``train_batch_size = micro * gas * dp``): cp ranks hold shards of the same samples. Gradients are
reduced over ``dp_cp``; DeepSpeed divides the sum by :func:`grad_divisor`, which
:meth:`TrainEngine.backward` multiplies back.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from megaring.distributed.deepspeed_mpu import DeepSpeedMPU
from megaring.distributed.mesh import Axis, ParallelMesh
from megaring.engine import deepspeed_internals as internals
from megaring.engine.deepspeed_internals import (  # noqa: F401 - ZeroPartitionWriter: re-exported, tests import it here
    ZeroPartitionWriter,
    is_partitioned,
    unpartitioned_shape,
)
from megaring.model.init import ShardWriter, tp_partitions
from megaring.train.config import TrainConfig


@dataclass(frozen=True)
class StepOutcome:
    """What an optimizer step did at the accumulation boundary."""

    grad_norm: float | None  # global norm before clipping (inf / nan when non-finite)
    applied: bool  # False: skipped on every rank (non-finite gradients)


class TrainEngine:
    """The training engine: the one owner of DeepSpeed (ZeRO over ``dp_cp``, our optimizer).

    The rest of the trainer calls only these methods. Per micro-batch: :meth:`forward`, then
    :meth:`backward` of this rank's share of the global mean loss (see
    :func:`megaring.model.local_loss`), then :meth:`step`, which updates at the accumulation
    boundary and returns the gradient norm there.
    """

    def __init__(self, ds, *, zero_stage: int, grad_divisor: int, tp: Axis, reports_grad_norm: bool,
                 dp_cp_rank: int = 0):
        self.ds = ds  # deepspeed.DeepSpeedEngine
        self.zero_stage = zero_stage
        self.grad_divisor = grad_divisor  # DeepSpeed's reduced gradient = sum over dp_cp / grad_divisor
        self.tp = tp
        self.dp_cp_rank = dp_cp_rank  # without ZeRO the first rank of dp_cp writes the fp32 state
        self.reports_grad_norm = reports_grad_norm  # False: fp32 without ZeRO, where DeepSpeed keeps no norm
        self._masters: dict[int, torch.Tensor] | None = None  # id(param) -> its fp32 master (no ZeRO)

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    def set_lr(self, lr: float) -> None:
        """The rate of the next update (DeepSpeed's ZeRO optimizers expose the inner param groups)."""
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    def forward(self, tokens, positions, segment_ids, labels=None, predict: bool = False):
        """The model's logits, or with ``labels`` its float32 token losses, or with ``predict`` its greedy
        next tokens at the labelled positions (see ``Transformer``)."""
        if predict:
            return self.ds(tokens, positions, segment_ids, labels=labels, predict=True)
        return self.ds(tokens, positions, segment_ids, labels=labels)

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss``, this rank's share of the global mean (shares sum to it over ``dp_cp``).

        DeepSpeed sums gradients over ``dp_cp`` and divides by :attr:`grad_divisor`; multiplying
        here cancels that, and ``scale_wrt_gas=False`` stops a second division by the accumulation steps.
        """
        self.ds.backward(loss * self.grad_divisor, scale_wrt_gas=False)

    def step(self) -> StepOutcome | None:
        """Update at the accumulation boundary and return the global gradient norm (before clipping)
        and whether the update was applied; between micro-batches only count the micro-batch and
        return None.

        A non-finite gradient norm skips the update on every rank (the optimizer is not stepped and
        the gradients are dropped): DeepSpeed's own check under ZeRO and bf16 (all-reduced over the
        mesh; :func:`build_engine` turns it on for ZeRO 1-2 in bf16), ours for fp32 without ZeRO,
        where the norm is already global.
        """
        boundary = self.ds.is_gradient_accumulation_boundary()
        own_norm = own_grad_norm(self.module, self.tp) if boundary and not self.reports_grad_norm else None
        if own_norm is not None and not math.isfinite(own_norm):
            for p in self.module.parameters():  # torch's AdamW leaves parameters without a gradient alone
                p.grad = None
        self.ds.step()
        if not boundary:
            return None
        norm = self.ds.get_global_grad_norm() if self.reports_grad_norm else own_norm
        norm = None if norm is None else float(norm.item() if torch.is_tensor(norm) else norm)
        applied = self.ds.was_step_applied() and (own_norm is None or math.isfinite(own_norm))
        return StepOutcome(norm, applied)

    def set_batch(self, cfg: TrainConfig) -> None:
        """DeepSpeed's batch sizes for ``cfg`` (a new stage of ``data.stages``), between two steps."""
        ds = deepspeed_config(cfg, torch.float32)
        internals.restart_accumulation(self.ds, ds["train_micro_batch_size_per_gpu"], ds["train_batch_size"])

    def save(self, directory: Path, tag: str) -> None:
        """This rank's model, optimizer and ZeRO shards under ``directory/tag`` (collective)."""
        self.ds.save_checkpoint(str(directory), tag=tag, save_latest=False)

    def load(self, directory: Path, tag: str) -> None:
        """Restore what :meth:`save` wrote (same layout), reading with ``weights_only=True``."""
        path, _ = self.ds.load_checkpoint(str(directory), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {directory / tag}")

    def destroy(self) -> None:
        self.ds.destroy()

    # Layout-independent optimizer state (megaring.checkpoint.universal): per parameter, this rank's own
    # fragment of its tp shard's fp32 master weight and Adam moments, without communication.

    def master_fragment(self, param: nn.Parameter, key: str) -> tuple[int, torch.Tensor] | None:
        """``(start, flat)``: the elements ``[start, start + flat.numel())`` of ``param``'s flattened tp
        shard of ``key`` (``"param"``, ``"exp_avg"``, ``"exp_avg_sq"``) in float32 that this rank
        owns, or None when another rank owns them all. ZeRO: this rank's partition of it; without
        ZeRO the whole shard, owned by the first rank of ``dp_cp`` (every one holds a copy). Call
        :meth:`link_optimizer_views` first; no communication."""
        if internals.is_zero_managed(param):
            found = internals.local_fp32_fragment(param, key)
            return None if found is None else (found[0], found[1].detach().float())
        if self.dp_cp_rank != 0:
            return None
        master = self._fp32_master(param)
        value = master if key == "param" else self._torch_optimizer().state[master][key]
        return 0, value.detach().float().reshape(-1)

    def master_state(self, param: nn.Parameter, key: str) -> torch.Tensor:
        """``key`` of ``param`` in float32, this tp rank's whole shard, gathered over ZeRO's partitions
        (collective over ``dp_cp`` under ZeRO: every rank calls it, same order). For checks and
        tests; checkpoints write :meth:`master_fragment` instead, without communication."""
        if internals.is_zero_managed(param):
            return internals.full_fp32_state(param, key).detach().float()
        master = self._fp32_master(param)
        value = master if key == "param" else self._torch_optimizer().state[master][key]
        return value.detach().float()

    def master_range(self, param: nn.Parameter) -> tuple[int, int] | None:
        """The flat elements ``[start, stop)`` of ``param``'s tp shard whose fp32 state this rank keeps
        (ZeRO: its partition; without ZeRO the whole shard), None when it keeps none."""
        if internals.is_zero_managed(param):
            return internals.local_fp32_range(param)
        return 0, internals.unpartitioned_shape(param).numel()

    def set_master_fragment(self, param: nn.Parameter, key: str, flat: torch.Tensor) -> None:
        """Set ``key`` of ``param`` on the elements :meth:`master_range` names from ``flat`` (as many
        elements); call :meth:`prime_optimizer_states` first on an engine that has not stepped yet."""
        if internals.is_zero_managed(param):
            internals.set_local_fp32_fragment(param, key, flat)
        elif key == "param":
            self._fp32_master(param).data.view(-1).copy_(flat)
        else:
            self._torch_optimizer().state[self._fp32_master(param)][key].view(-1).copy_(flat)

    def set_master_state(self, param: nn.Parameter, key: str, value: torch.Tensor) -> None:
        """Set ``key`` of ``param`` from ``value`` (this tp rank's whole shard; each rank keeps its own
        fragment); call :meth:`prime_optimizer_states` first on an engine that has not stepped yet."""
        if internals.holds_fragment(param):
            internals.set_full_fp32_state(param, key, value)
        elif internals.is_zero_managed(param):
            return  # ZeRO 1-2: this rank's partition holds no piece of this parameter
        elif key == "param":
            self._fp32_master(param).data.copy_(value)
        else:
            self._torch_optimizer().state[self._fp32_master(param)][key].copy_(value)

    def _fp32_master(self, param: nn.Parameter) -> torch.Tensor:
        """The tensor torch's optimizer updates for ``param`` without ZeRO: the parameter itself in
        float32, its fp32 copy with half-precision weights."""
        if self._masters is None:  # built once: the groups do not change after deepspeed.initialize
            self._masters = internals.fp32_twins(self.ds.optimizer)
        return self._masters.get(id(param), param)

    def optimizer_step(self) -> int:
        """Updates the optimizer has made (Adam's bias-correction step)."""
        for state in self._torch_optimizer().state.values():
            if "step" in state:
                return int(state["step"])
        return 0

    def has_optimizer_state(self) -> bool:
        """False until the first update creates Adam's moments (a run whose steps were all skipped)."""
        return any(self._torch_optimizer().state.values())

    def prime_optimizer_states(self, step: int) -> None:
        """Create Adam's state at update count ``step`` with zero moments, as torch would at its first
        step, and link DeepSpeed's per-parameter views to it, so that :meth:`set_master_state` can
        fill it. For resuming from a layout-independent checkpoint."""
        opt = self._torch_optimizer()
        on_device = any(g.get("fused") or g.get("capturable") for g in opt.param_groups)
        flat = internals.zero3_flat_partitions(self.ds.optimizer)
        for p in flat if flat is not None else [p for g in opt.param_groups for p in g["params"]]:
            opt.state[p] = {
                    "step": torch.tensor(float(step), dtype=torch.float32, device=p.device if on_device else "cpu"),
                    "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
                }
        self.link_optimizer_views()

    def link_optimizer_views(self) -> None:
        """(Re)point DeepSpeed's per-parameter views at Adam's state; call before :meth:`master_fragment`."""
        internals.relink_optimizer_views(self.ds.optimizer)

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        """The torch (or apex) optimizer inside DeepSpeed's wrappers."""
        opt = self.ds.optimizer
        while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
            opt = opt.optimizer
        return opt


def own_grad_norm(model: torch.nn.Module, tp: Axis) -> float:
    """Global 2-norm of reduced gradients: replicated parameters once, tp shards from every tp rank."""
    device = next(model.parameters()).device
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for p in model.parameters():
        if p.grad is not None and (tp.rank == 0 or getattr(p, "tensor_model_parallel", False)):
            squares += p.grad.detach().to(torch.float64).pow(2).sum()
    if tp.size > 1:
        dist.all_reduce(squares, group=tp.group)
    return squares.sqrt().item()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def grad_divisor(zero_stage: int, mesh: ParallelMesh) -> int:
    """What DeepSpeed (0.15-0.19) divides the ``dp_cp`` gradient sum by.

    Stages 0-2 average over the sequence-data-parallel group and multiply back by the sequence
    parallel size (cp): ``/ dp``. Stage 3 reduce-scatters over its partition group (``dp_cp``, see
    :func:`partitioned_construction`) and averages over it, ignoring cp: ``/ dp_cp``. The parity tests
    check both at every stage.
    """
    return mesh.dp_cp.size if zero_stage == 3 else mesh.dp.size


def deepspeed_config(cfg: TrainConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The DeepSpeed config, derived from ours; ``parallel.deepspeed`` adds (never overrides) keys."""
    t, p = cfg.trainer, cfg.parallel
    groups = p.cp // cfg.attention_cp()
    zero = {"stage": p.zero_stage}
    ds = copy.deepcopy(dict(p.deepspeed))
    zero.update(ds.pop("zero_optimization", {}))
    if p.zero_stage == 3:
        zero["reduce_scatter"] = True  # the path grad_divisor describes
    ds.update({
        "train_batch_size": t.global_batch_size,
        # parallel.dynamic_cp: each of a dp rank's cp / cp' groups forwards its own micro-batch at
        # once, so DeepSpeed counts cp / cp' of ours as one (its accumulation boundary stays right)
        "train_micro_batch_size_per_gpu": t.micro_batch_size * groups,
        "gradient_accumulation_steps": t.global_batch_size // (t.micro_batch_size * groups * p.dp),
        "gradient_clipping": cfg.optim.grad_clip,  # DeepSpeed's default would be 1.0
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # torch AdamW / apex FusedAdam
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    })
    return ds


def mark_tp_parameters(model: nn.Module) -> None:
    """Tag tp-sharded parameters the way DeepSpeed's gradient norm expects (Megatron's attribute).

    Replicated parameters then count once (on tp rank 0) and sharded ones on every tp rank.
    """
    params = dict(model.named_parameters())
    for name in tp_partitions(model):
        if name in params:
            params[name].tensor_model_parallel = True


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW without weight decay on vectors (norms, biases); apex FusedAdam when installed on CUDA."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    matrices = [p for p in params if len(unpartitioned_shape(p)) >= 2]
    vectors = [p for p in params if len(unpartitioned_shape(p)) < 2]
    groups = [{"params": matrices, "weight_decay": o.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    kwargs = {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps}
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam  # optional: not on the package index
        except ImportError:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        return FusedAdam(groups, adam_w_mode=True, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


@contextmanager
def partitioned_construction(cfg: TrainConfig, mesh: ParallelMesh, device: torch.device) -> Iterator[ShardWriter]:
    """Build the model inside; yields the :class:`ShardWriter` that fills its parameters.

    Under ZeRO-3 this is ``deepspeed.zero.Init`` over ``dp_cp`` (left to itself, ZeRO-3 partitions
    over ``mpu.get_data_parallel_group()``, dp only, so cp ranks would neither share parameter
    shards nor reduce their gradients): every module's parameters are partitioned, in the training
    dtype, as soon as the module is built, so no rank ever holds more than its partition of the
    model plus one module's shard; the writer is a :class:`ZeroPartitionWriter`. This is the only
    way a ZeRO-3 model is partitioned. Without ZeRO-3 nothing changes (a plain writer).
    """
    if cfg.parallel.zero_stage != 3:
        yield ShardWriter()
        return
    deepspeed = _deepspeed()
    mpu = DeepSpeedMPU(mesh)
    ds_config = deepspeed_config(cfg, resolve_dtype(cfg.trainer.dtype, device))
    with internals.zero3_construction(deepspeed, group=mpu.get_sequence_data_parallel_group(), mpu=mpu,
                                      ds_config=ds_config) as writer:
        yield writer


def use_this_environments_tools() -> None:
    """Put this interpreter's ``bin`` first on PATH. DeepSpeed JIT-builds its shared-memory op with
    the first ``ninja`` there, and two ninja versions (the venv's and the system's) rebuild it, about
    35 s, at every switch between an activated and a plain shell."""
    bindir = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if (Path(bindir) / "ninja").exists() and not path.startswith(bindir + os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + path


def _deepspeed():
    """DeepSpeed, imported quietly, with its communication set up on our process group."""
    use_this_environments_tools()
    import deepspeed

    deepspeed.utils.logger.setLevel(logging.WARNING)
    logging.getLogger("compilers").setLevel(logging.WARNING)  # the op builder's compiler probes, at INFO
    # Warnings ZeRO triggers every step (reduce_scatter_tensor's deprecation, ...): once per process.
    warnings.filterwarnings("once", category=FutureWarning)
    warnings.filterwarnings("once", category=UserWarning, module=r"(deepspeed|torch\.distributed)")
    # DeepSpeed's ZeRO calls a torch collective that torch has renamed; not ours to change, only noise.
    # (Added last: filters added later are matched first.)
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), verbose=False)
    return deepspeed


def build_engine(model: nn.Module, cfg: TrainConfig, mesh: ParallelMesh, device: torch.device) -> TrainEngine:
    """The engine around ``model``, built under :func:`partitioned_construction` (ZeRO-3 needs it)."""
    deepspeed = _deepspeed()
    dtype = resolve_dtype(cfg.trainer.dtype, device)
    partitioned = is_partitioned(model)
    if not partitioned:
        model = model.to(device)  # DeepSpeed casts to bf16 itself and keeps fp32 master weights
    mark_tp_parameters(model)
    ds_config = deepspeed_config(cfg, dtype)
    mpu = DeepSpeedMPU(mesh)
    if cfg.parallel.zero_stage == 3 and not partitioned:
        raise ValueError("parallel.zero_stage=3 needs a model built under partitioned_construction "
                         "(megaring.train.trainer.build_weights does so); this one is not partitioned")
    optimizer = build_optimizer(model, cfg, device)
    ds, *_ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=mpu,
                                  config=ds_config, dist_init_required=False)
    internals.use_safe_loading(ds)
    if dtype == torch.bfloat16:  # ZeRO 1-2: off in bf16 unless asked
        internals.turn_on_bf16_overflow_check(ds.optimizer)
    stage = cfg.parallel.zero_stage
    return TrainEngine(ds, zero_stage=stage, grad_divisor=grad_divisor(stage, mesh), tp=mesh.tp,
                       reports_grad_norm=stage > 0 or dtype != torch.float32, dp_cp_rank=mesh.dp_cp.rank)
