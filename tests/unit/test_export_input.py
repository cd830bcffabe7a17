"""``megaring-export`` and ``model.init_from`` on bad input, single process: each is one error (exit
status 2 from the command) naming the path. No training: the checkpoint directories are made by hand."""

from __future__ import annotations

import json

import pytest

from megaring.cli.export import main
from megaring.hf.weights import CheckpointError, read_weight_map
from tests.helpers.hf_models import llama_dir


def _run_dir(tmp_path, steps=(2,), partial=(), latest=2):
    ckpt = tmp_path / "run" / "checkpoints"
    for step in steps:
        (ckpt / f"step_{step:08d}" / "universal").mkdir(parents=True)
        (ckpt / f"step_{step:08d}" / "trainer_state.json").write_text("{}")
    for step in partial:
        (ckpt / f"step_{step:08d}.partial").mkdir(parents=True)
    (ckpt / "latest").write_text(f"step_{latest:08d}")
    return tmp_path / "run", ckpt


def _export_error(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    assert exit_.value.code == 2
    return capsys.readouterr().err


def test_export_names_what_is_wrong(tmp_path, capsys):
    run, ckpt = _run_dir(tmp_path, steps=(2,), partial=(4,))
    out = f"output={tmp_path / 'out'}"
    err = _export_error(capsys, f"input={run}", out, "step=3")
    assert f"{ckpt / 'step_00000003'} does not exist" in err and "step_00000002" in err
    err = _export_error(capsys, f"input={run}", out, "step=4")
    assert f"{ckpt / 'step_00000004.partial'} is a save that did not complete; choose another step" in err
    (ckpt / "step_00000002" / "universal" / "meta.json").write_text("{not json")
    err = _export_error(capsys, f"input={run}", out)
    assert f"{ckpt / 'step_00000002' / 'universal' / 'meta.json'} is corrupted" in err
    (ckpt / "step_00000002" / "universal" / "meta.json").write_text(json.dumps({"format": 99, "weight_map": {}}))
    assert "has format 99" in _export_error(capsys, f"input={run}", out)
    err = _export_error(capsys, f"input={tmp_path / 'nowhere'}", out, "dtype=int8")
    assert "nowhere does not exist" in err and "dtype=int8 must be one of" in err
    (tmp_path / "empty").mkdir()
    assert "holds no megaring checkpoint" in _export_error(capsys, f"input={tmp_path / 'empty'}", out)
    assert "usage: megaring-export" in _export_error(capsys, f"input={run}")  # no output=


def test_corrupted_index_names_the_file(tmp_path):
    directory = llama_dir(tmp_path / "hf", max_shard_size="50KB")
    index = directory / "model.safetensors.index.json"
    index.write_text("{\"weight_map\": ")
    with pytest.raises(CheckpointError, match=f"{index}: not a safetensors index"):
        read_weight_map(directory)
