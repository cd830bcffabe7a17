"""Every use of a DeepSpeed internal, in one place, and the DeepSpeed versions they are tested with.

DeepSpeed's public API (``deepspeed.initialize``, the engine's ``save_checkpoint`` /
``load_checkpoint``, ``deepspeed.utils.safe_*_full_*``) does not cover everything megaring needs:
this rank's own fragment of a parameter's fp32 master and Adam moments (a checkpoint that every
rank writes in parallel), the fp32 twins of half-precision weights without ZeRO, ZeRO-3's
partitioned storage (to fill a partition while loading), and a checkpoint engine that reads with
``torch.load(weights_only=True)``. Each function below names the internal it touches and why.
These attributes change between DeepSpeed releases without notice, so :func:`version_problem`
refuses a DeepSpeed outside :data:`TESTED_RANGE` (the test suite runs 0.19.8 only) unless
``parallel.allow_untested_deepspeed=true``. The rest of megaring talks to DeepSpeed through
:mod:`megaring.engine.deepspeed_engine` and this module only.
"""

from __future__ import annotations

from contextlib import contextmanager
from importlib import metadata

import torch
from packaging.version import InvalidVersion, Version
from torch import nn

from megaring.model.init import ShardWriter

# The DeepSpeed releases the suite runs (0.19.8 only); keep in step with pyproject.toml's pin.
TESTED_MIN, TESTED_BELOW = "0.19.8", "0.20"
TESTED_RANGE = f">={TESTED_MIN},<{TESTED_BELOW}"


def installed_version() -> str | None:
    """The installed DeepSpeed's version (from its package metadata, without importing it)."""
    try:
        return metadata.version("deepspeed")
    except metadata.PackageNotFoundError:
        return None


def version_problem(installed: str | None, allow_untested: bool) -> str | None:
    """A config problem when ``installed`` is outside :data:`TESTED_RANGE` (None: fine or overridden)."""
    if installed is None:
        return f"DeepSpeed is not installed: install deepspeed{TESTED_RANGE} (pip install 'deepspeed{TESTED_RANGE}')"
    if allow_untested:
        return None
    try:
        inside = Version(TESTED_MIN) <= Version(installed) < Version(TESTED_BELOW)
    except InvalidVersion:
        inside = False
    if inside:
        return None
    return (f"DeepSpeed {installed} is installed, but megaring reaches into DeepSpeed internals tested only with "
            f"deepspeed{TESTED_RANGE} (the suite runs 0.19.8): install deepspeed=={TESTED_MIN}, or set "
            "parallel.allow_untested_deepspeed=true to run anyway (checkpoints and resumes may break silently)")


# ---- the optimizer wrappers (ZeRO 1-2 and the bf16 optimizer: DeepSpeedZeroOptimizer, BF16_Optimizer)

def relink_optimizer_views(wrapper) -> None:
    """Point every parameter's ``_hp_mapping`` at Adam's current state.

    Internal: ``_hp_optimizer_states_linked`` / ``_lazy_init_hp_params_optimizer_state``. ZeRO 1-2
    and the bf16 optimizer link these views once, after the first param group's first step, so the
    views of later groups (ours: the weights without decay) would stay empty; and a resume that
    replaces Adam's state needs them pointed at the new tensors.
    """
    if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state"):
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()


def fp32_twins(wrapper) -> dict[int, torch.Tensor]:
    """``id(half-precision weight) -> its fp32 master`` without ZeRO (empty in fp32).

    Internal: ``fp16_groups`` / ``fp32_groups`` of DeepSpeed's unpartitioned fp16/bf16 optimizer,
    the only place those masters are reachable from a parameter.
    """
    pairs = zip(getattr(wrapper, "fp16_groups", ()), getattr(wrapper, "fp32_groups", ()), strict=False)
    return {id(low): high for lows, highs in pairs for low, high in zip(lows, highs, strict=True)}


def zero3_flat_partitions(wrapper) -> list[torch.Tensor] | None:
    """ZeRO-3's flat fp32 partitions (the tensors Adam's state belongs to), None under other stages.

    Internal: ``fp32_partitioned_groups_flat``. ZeRO-3 steps them one sub-group at a time, so they
    are not (all) in the torch optimizer's param groups between steps.
    """
    return getattr(wrapper, "fp32_partitioned_groups_flat", None)


def turn_on_bf16_overflow_check(wrapper) -> None:
    """Make ZeRO 1-2 in bf16 skip non-finite steps (internal ``check_grad_overflow``: off in bf16)."""
    if hasattr(wrapper, "check_grad_overflow"):
        wrapper.check_grad_overflow = True


# ---- one parameter's fp32 state, this rank's fragment

def is_zero_managed(param: nn.Parameter) -> bool:
    """Whether ZeRO (1-3) or the bf16 optimizer holds ``param``'s fp32 state (internal attributes
    ``ds_id`` under ZeRO-3, ``_hp_mapping`` under ZeRO 1-2 and the bf16 optimizer)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def holds_fragment(param: nn.Parameter) -> bool:
    """Whether this rank's partition holds a piece of ``param`` (ZeRO 1-2: ``_hp_mapping`` is None
    when it does not; ZeRO-3 partitions every parameter over every rank)."""
    return hasattr(param, "ds_id") or getattr(param, "_hp_mapping", None) is not None


def local_fp32_fragment(param: nn.Parameter, key: str) -> tuple[int, torch.Tensor] | None:
    """``(start, flat)``: this rank's own piece of ``param``'s fp32 ``key`` ("param", "exp_avg",
    "exp_avg_sq"), the elements ``[start, start + flat.numel())`` of the flattened (tp shard of the)
    parameter, a view without copy or communication. None: ZeRO does not hold the parameter, or
    this rank's partition has no piece of it.

    ZeRO-3 (``ds_id``, ``ds_numel``, ``ds_zero_partition_rank``): the partition is the flattened
    parameter padded to a multiple of the group's size, cut in equal parts, rank ``r`` owning part
    ``r`` (``_z3_optimizer.get_local_fp32_param``, public as ``safe_get_local_*``); the padding is
    dropped here. ZeRO 1-2 (``_hp_mapping``): the flat groups are cut at arbitrary element offsets;
    ``lp_fragment_address`` says where this rank's fragment of the parameter starts.
    """
    state_key = None if key == "param" else key
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        local = safe_get_local_fp32_param(param) if state_key is None else safe_get_local_optimizer_state(param, key)
        start = param.ds_zero_partition_rank * local.numel()
        return start, local.reshape(-1)[:max(0, min(local.numel(), param.ds_numel - start))]
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    return mapping.lp_fragment_address.start, mapping.get_hp_fragment(state_key).reshape(-1)


def local_fp32_range(param: nn.Parameter) -> tuple[int, int] | None:
    """The flat elements ``[start, stop)`` of ``param`` whose fp32 state this rank's partition keeps,
    None when it keeps none (the same internals as :func:`local_fp32_fragment`, without reading)."""
    if hasattr(param, "ds_id"):
        size = param.ds_tensor.ds_numel
        start = param.ds_zero_partition_rank * size
        return min(start, param.ds_numel), min(start + size, param.ds_numel)
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    address = mapping.lp_fragment_address
    return address.start, address.start + address.numel


def set_local_fp32_fragment(param: nn.Parameter, key: str, flat: torch.Tensor) -> None:
    """Set this rank's own piece of ``param``'s fp32 ``key`` to ``flat``, the elements
    :func:`local_fp32_range` names. ZeRO-3: public ``safe_set_local_*``, given the partition padded
    to its size; ZeRO 1-2: copied into ``_hp_mapping``'s fragment (internal)."""
    state_key = None if key == "param" else key
    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

        padded = flat.new_zeros(param.ds_tensor.ds_numel)
        padded[:flat.numel()] = flat
        padded = padded.to(param.ds_tensor.device)
        if state_key is None:
            safe_set_local_fp32_param(param, padded)
        else:
            safe_set_local_optimizer_state(param, padded, key)
        return
    fragment = param._hp_mapping.get_hp_fragment(state_key)
    fragment.data.copy_(flat.view_as(fragment).to(fragment.device))


def full_fp32_state(param: nn.Parameter, key: str) -> torch.Tensor:
    """``param``'s fp32 ``key``, the whole (tp shard of the) parameter, gathered over ZeRO's partition
    group (public ``safe_get_full_*``; collective: every rank of the group calls it, same order)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    return safe_get_full_fp32_param(param) if key == "param" else safe_get_full_optimizer_state(param, key)


def set_full_fp32_state(param: nn.Parameter, key: str, value: torch.Tensor) -> None:
    """Set this rank's fragment of ``param``'s fp32 ``key`` from ``value``, the whole (tp shard of
    the) parameter (public ``safe_set_full_*``; each rank keeps only its own elements)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    value = value.to(param.device)
    if key == "param":
        safe_set_full_fp32_param(param, value)
    else:
        safe_set_full_optimizer_state(param, value, key)


# ---- ZeRO-3's partitioned parameters

def unpartitioned_shape(param: nn.Parameter) -> torch.Size:
    """This rank's parameter shape, also when ZeRO-3 has replaced its data by an empty partition
    (internal ``ds_shape``)."""
    return getattr(param, "ds_shape", param.shape)


def is_partitioned(model: nn.Module) -> bool:
    """Whether ZeRO-3 has partitioned the model's parameters already (internal ``ds_id``)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


class ZeroPartitionWriter(ShardWriter):
    """Fills parameters that ZeRO-3 partitioned at construction (:func:`zero3_construction`).

    ZeRO-3 keeps of a parameter's (tp shard's) flattened ``ds_numel`` elements, padded to a multiple
    of the partition group's size ``n``, the ``ds_tensor.ds_numel = ceil(ds_numel / n)`` elements
    from ``rank * ds_tensor.ds_numel`` on; the padding is zeroed here. Internal: ``ds_shape``,
    ``ds_numel``, ``ds_tensor``, ``ds_zero_partition_rank`` (the storage behind a partitioned parameter).
    """

    def shard_shape(self, param: nn.Parameter) -> torch.Size:
        return param.ds_shape

    def owned_range(self, param: nn.Parameter) -> tuple[int, int]:
        size = param.ds_tensor.ds_numel
        start = param.ds_zero_partition_rank * size
        return min(start, param.ds_numel), min(start + size, param.ds_numel)

    def write(self, param: nn.Parameter, flat: torch.Tensor) -> None:
        with torch.no_grad():
            param.ds_tensor[:flat.numel()].copy_(flat)
            param.ds_tensor[flat.numel():].zero_()


@contextmanager
def zero3_construction(deepspeed, *, group, mpu, ds_config: dict):
    """Modules built inside are partitioned over ``group`` as each is built (``deepspeed.zero.Init``,
    public; given ``group`` because left to itself it partitions over dp only, not dp x cp)."""
    with deepspeed.zero.Init(data_parallel_group=group, mpu=mpu, config_dict_or_path=ds_config):
        yield ZeroPartitionWriter()


# ---- DeepSpeed's checkpoint engine

def deepspeed_safe_globals() -> list:
    """The few DeepSpeed classes its checkpoints pickle (besides tensors and plain containers);
    internal module paths."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [DynamicLossScaler, LossScaler, ZeroStageEnum, fragment_address]


def use_safe_loading(ds_engine) -> None:
    """Make DeepSpeed read its checkpoint files with ``torch.load(weights_only=True)``.

    Internal: ``TorchCheckpointEngine`` and the engine's ``checkpoint_engine`` / ``_config``
    attributes; DeepSpeed offers no option for safe loading.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(deepspeed_safe_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)

    ds_engine.checkpoint_engine = SafeTorchCheckpointEngine(ds_engine._config)


def restart_accumulation(engine, micro_batch_size: int, global_batch_size: int) -> None:
    """A new batch shape between two steps (a stage of ``data.stages``): DeepSpeed's micro-batch and
    global batch through its public setters, which derive the accumulation steps, and the internal
    ``micro_steps`` counter set back to 0. DeepSpeed finds its accumulation boundary from that
    counter modulo the accumulation steps, so a counter left at a multiple of the old steps would
    put the first boundary of the new shape in the wrong micro-batch. The counter feeds nothing
    else in the versions of TESTED_RANGE (and is not saved: a resumed engine starts it at 0 too)."""
    engine.set_train_micro_batch_size(micro_batch_size)
    engine.set_train_batch_size(global_batch_size)
    engine.micro_steps = 0
