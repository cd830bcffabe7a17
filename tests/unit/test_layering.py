"""The package's layers: tokenising text needs none of the attention, kernel or distributed code."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.cli import ROOT

TOKENISE = """
import sys
from pathlib import Path
from megaring.data import PreprocessConfig, TokenizerConfig, open_dataset
from megaring.data.preprocess import preprocess

src = Path(sys.argv[1]) / "corpus.txt"
src.write_text("".join(f"line {i} of a small corpus about rings and meshes\\n" for i in range(400)))
out = Path(sys.argv[1]) / "store"
preprocess(PreprocessConfig(input=str(src), output=str(out), workers=0, progress=False,
                            tokenizer=TokenizerConfig(vocab_size=300)))
assert open_dataset(out).num_tokens > 0
print(sorted(m for m in sys.modules if m.startswith("megaring.")))
"""


def test_tokenising_text_imports_no_ring_kernel_or_distributed_module(tmp_path):
    proc = subprocess.run([sys.executable, "-c", TOKENISE, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = eval(proc.stdout.strip().splitlines()[-1])  # the printed list of module names
    assert "megaring.data.preprocess" in loaded
    leaked = [m for m in loaded if m.startswith(("megaring.ring", "megaring.kernels", "megaring.distributed",
                                                  "megaring.model", "megaring.train", "megaring.engine",
                                                  "megaring.checkpoint", "megaring.ops", "megaring.cli"))]
    assert leaked == []
