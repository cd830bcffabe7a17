"""The local spawner at tp=2 on a bad ``model.init_from``: a reason that both workers find as they load
(NaN in a weight every tp rank reads) is printed once, with exit status 2 and no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from tests.helpers.cli import clean_env
from tests.helpers.hf_models import llama_dir

pytestmark = pytest.mark.slow


def test_nan_weights_at_tp2_are_one_message_and_exit_2(tmp_path):
    directory = llama_dir(tmp_path / "hf")
    tensors = load_file(directory / "model.safetensors")
    tensors["model.norm.weight"][3] = float("nan")  # whole on every tp rank
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    proc = subprocess.run(
        [sys.executable, "-m", "megaring.train", "data=mock", "data.vocab_size=101", "trainer.seq_len=32",
         "trainer.global_batch_size=2", "trainer.max_steps=1", "logging.wandb.mode=disabled",
         "logging.progress_bar=false", "parallel.timeout_s=60", "parallel.tp=2", "parallel.nproc_per_node=2",
         f"model.init_from={directory}", f"hydra.run.dir={tmp_path / 'run'}"],
        env=clean_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    reason = (f"megaring-train: cannot load the Hugging Face checkpoint: 1 tensor of {directory / 'model.safetensors'}"
              " holds NaN or inf values: 'model.norm.weight'")
    assert proc.stderr.count(reason) == 1, proc.stderr[-3000:]
    assert proc.stderr.count("NaN or inf") == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
