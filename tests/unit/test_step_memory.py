"""StepMemory: what a step adds at its peak over the memory resident before it, and the process peak."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from megaring.train.metrics import StepMemory

GIB = 2**30


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_step_memory_is_the_step_high_water_mark_and_the_process_peak_survives_the_reset():
    memory = StepMemory(torch.device("cpu"))
    big = torch.ones(2**28 // 4)  # 256 MiB resident before the first step: not the first step's
    memory.start()
    temp = torch.ones(2**27 // 4)  # the first step's peak: 128 MiB, freed before it ends
    del temp
    first = memory.metrics()
    assert 0.12 < first["step_mem_gib"] < 0.16
    del big
    memory.start()
    second = memory.metrics()  # a step that allocates nothing, after the 256 MiB left
    assert second["step_mem_gib"] < 0.02
    assert second["peak_mem_gib"] >= first["peak_mem_gib"] > 0.37  # the process peak is kept across resets
