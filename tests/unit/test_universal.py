"""The layout-independent checkpoint format, single process: four ranks' pieces (tp=2, two ZeRO-like
partitions at arbitrary element offsets) written one rank at a time, then read back as full rows
and as shards of other tp sizes, bit for bit. No DeepSpeed: a small fake engine hands out the
fragments (the real engines' fragments are checked by the multi-process export and resume tests)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from torch import nn

from megaring.checkpoint import universal
from megaring.checkpoint.universal import KEYS, UniversalError, UniversalState, dim0_sources, save_universal
from megaring.model import ModelConfig
from megaring.tensor_parallel.utils import Partition

# name -> (full shape, partition over tp; None: replicated)
PARAMS = {
    "qkv": ((12, 3), Partition(0, (4, 8))),  # fused blocks along dim 0
    "out": ((5, 8), Partition(1, (8,))),  # split along dim 1
    "embed": ((7, 3), Partition(0, (8,), unpadded=7)),  # vocabulary padded to a multiple of tp
    "norm": ((5,), None),
}
TP, DP_CP = 2, 2
WORLD = TP * DP_CP


def full_value(key: str, name: str) -> torch.Tensor:
    shape, _ = PARAMS[name]
    seed = KEYS.index(key) * 100 + list(PARAMS).index(name)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


class _Module(nn.Module):
    """One parameter per name, at its tp shard's shape, with the partitions megaring's layers declare."""

    def __init__(self, tp_rank: int):
        super().__init__()
        self.tp_partitions = {name: part for name, (_, part) in PARAMS.items() if part is not None}
        for name, (_, part) in PARAMS.items():
            shard = full_value("param", name) if part is None else part.shard(full_value("param", name), tp_rank, TP)
            self.register_parameter(name, nn.Parameter(shard))


@dataclass
class _FakeEngine:
    """Rank ``(dp_cp_rank, tp_rank)`` owns a slice of each flattened shard, cut at an odd offset."""

    tp_rank: int
    dp_cp_rank: int

    def __post_init__(self):
        self.module = _Module(self.tp_rank)
        self.tp = SimpleNamespace(rank=self.tp_rank, size=TP)

    def link_optimizer_views(self) -> None:
        pass

    def optimizer_step(self) -> int:
        return 7

    def master_fragment(self, param, key):
        name = next(n for n, p in self.module.named_parameters() if p is param)
        _, part = PARAMS[name]
        full = full_value(key, name)
        flat = (full if part is None else part.shard(full, self.tp_rank, TP)).reshape(-1)
        cut = (flat.numel() * 2) // 5  # not a row boundary: ZeRO 1-2 cut anywhere
        start, stop = (0, cut) if self.dp_cp_rank == 0 else (cut, flat.numel())
        return start, flat[start:stop].clone()


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    for rank in range(WORLD):
        monkeypatch.setattr(universal, "dist", SimpleNamespace(get_rank=lambda r=rank: r, get_world_size=lambda: WORLD))
        engine = _FakeEngine(tp_rank=rank % TP, dp_cp_rank=rank // TP)
        save_universal(engine, tmp_path, model_cfg=ModelConfig(), dtype=torch.float32, tokenizer_files=[],
                       max_file_bytes=200)  # several files per rank
    return tmp_path


def test_every_rank_writes_only_its_own_pieces(checkpoint):
    directory = checkpoint / "universal"
    total = sum(saved_numel(name) for name in PARAMS) * len(KEYS)
    written = {}
    for rank in range(WORLD):
        files = sorted(directory.glob(f"rank_{rank:05d}-*.safetensors"))
        assert len(files) > 1  # bounded files
        numel = 0
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                numel += sum(handle.get_slice(k).get_shape()[0] for k in handle.keys())
        written[rank] = numel
        index = json.loads((directory / f"rank_{rank:05d}.json").read_text())
        assert {p["tp_rank"] for p in index["pieces"]} == {rank % TP}
        if rank % TP:  # replicated parameters come from tp rank 0 only
            assert "norm" not in {p["name"] for p in index["pieces"]}
    assert sum(written.values()) == total  # each element exactly once
    assert max(written.values()) < 0.4 * total  # rank 0 holds its partition, not a gathered whole
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["format"] == 2 and meta["world_size"] == WORLD and meta["optimizer_step"] == 7


def saved_numel(name: str) -> int:
    """Elements of all tp shards of ``name`` (the padded vocabulary's padding included)."""
    _, part = PARAMS[name]
    full = full_value("param", name)
    return full.numel() if part is None else sum(part.shard(full, r, TP).numel() for r in range(TP))


def test_full_tensors_and_rows_read_back_bit_identical(checkpoint):
    state = UniversalState(checkpoint)
    assert state.names() == list(PARAMS)
    for key in KEYS:
        for name, (shape, _) in PARAMS.items():
            full = full_value(key, name)
            assert state.shape(key, name) == shape
            assert torch.equal(state.tensor(key, name), full), (key, name)
            for start, stop in ((0, 1), (1, shape[0] - 1), (3, shape[0])):
                assert torch.equal(state.rows(key, name, start, stop), full[start:stop]), (key, name, start)


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_shards_at_another_tp_size(checkpoint, tp_size):
    state = UniversalState(checkpoint)
    reading = {"qkv": Partition(0, (4, 8)), "out": Partition(1, (8,)), "embed": Partition(0, (8,), unpadded=7),
               "norm": None}
    for rank in range(tp_size):
        tp = SimpleNamespace(rank=rank, size=tp_size)
        for name, part in reading.items():
            full = full_value("exp_avg", name)
            want = full if part is None else part.shard(full, rank, tp_size)
            assert torch.equal(state.shard("exp_avg", name, part, tp), want), (name, rank)
            flat = want.reshape(-1)  # a ZeRO partition of the new shard, cut mid-row
            for start, stop in ((0, 1), (1, flat.numel() - 2), (flat.numel() // 3, flat.numel())):
                got = state.shard_elements("exp_avg", name, part, tp, start, stop)
                assert torch.equal(got, flat[start:stop]), (name, rank, start)


def test_dim0_sources_follow_the_blocks():
    # blocks (4, 8) over tp=2: rank 0 holds full rows 0-1 and 4-7, rank 1 rows 2-3 and 8-11
    assert list(dim0_sources(Partition(0, (4, 8)), 2, 1, 9)) == [(0, 1, 2), (1, 0, 2), (0, 2, 6), (1, 2, 3)]
    # the padded vocabulary: 7 real rows of 8, rank 1 holds rows 4-6 and one row of padding
    assert list(dim0_sources(Partition(0, (8,), unpadded=7), 2, 0, 7)) == [(0, 0, 4), (1, 0, 3)]


def test_a_missing_rank_is_named(checkpoint):
    (checkpoint / "universal" / "rank_00003.json").unlink()
    with pytest.raises(UniversalError, match=r"rank_00003.json \(rank 3's index"):
        UniversalState(checkpoint)
    (checkpoint / "universal" / "rank_00003.json").write_text(json.dumps({"rank": 3, "pieces": []}))
    with pytest.raises(UniversalError, match=r"cover .* some rank's files are missing"):
        UniversalState(checkpoint).tensor("param", "out")


def test_the_older_single_writer_format_is_still_read(tmp_path):
    from safetensors.torch import save_file

    directory = tmp_path / "universal"
    directory.mkdir()
    save_file({"param.out": full_value("param", "out")}, str(directory / "state-00001.safetensors"))
    meta = {"format": 1, "optimizer_step": 3, "model": {}, "weight_map": {"param.out": "state-00001.safetensors"}}
    (directory / "meta.json").write_text(json.dumps(meta))
    state = UniversalState(tmp_path)
    tp = SimpleNamespace(rank=1, size=2)
    want = Partition(1, (8,)).shard(full_value("param", "out"), 1, 2)
    assert state.names() == ["out"] and torch.equal(state.shard("param", "out", Partition(1, (8,)), tp), want)
