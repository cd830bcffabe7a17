"""Per-step metrics: throughput, model FLOPs and MFU, memory; ``metrics.jsonl`` and the progress bar.

TFLOP/s are model FLOPs (``megaring.model.model_flops_per_token``, attention included) per second
per device; MFU divides them by the device's dense peak (bf16 tensor cores on CUDA). On CPU there
is no meaningful peak: MFU is left empty (``null``).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from megaring.train.step import StepResult

# Dense bf16 peak TFLOP/s per device, by a substring of torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = {
    "H200": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "GH200": 989.0,
    "B200": 2250.0, "A100": 312.0, "A10G": 70.0, "A10": 125.0, "L40S": 362.0, "L4": 121.0,
    "V100": 125.0, "A6000": 155.0, "4090": 165.0,
}


def device_peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    if override is not None:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS.items():
        if key in name:
            return peak
    return None


class StepMemory:
    """Memory per rank: the process's peak so far (``peak_mem_gib``) and what one training step adds
    at its peak to the memory resident just before it (``step_mem_gib``: its activations, working
    memory and gradients, the quantity ``megaring.plan`` predicts above the states kept between steps).

    CUDA: allocated bytes (``max_memory_allocated`` after ``reset_peak_memory_stats``). CPU: resident
    memory. ``start`` resets the kernel's high-water mark (``VmHWM``) to the current resident size
    through ``/proc/self/clear_refs``; that also resets ``ru_maxrss``, so the process peak is kept
    here. Without a writable ``/proc/self/clear_refs`` (not Linux) ``step_mem_gib`` is None.
    """

    def __init__(self, device: torch.device):
        self.device, self.before, self.peak, self.resets = device, 0, 0, True

    def start(self) -> None:
        """Call before the step reads its batch."""
        if self.device.type == "cuda":
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
            return
        self.peak = max(self.peak, _resident_peak())
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            self.before = _proc_status_bytes("VmRSS")
        except OSError:
            self.resets = False

    def metrics(self) -> dict:
        """Call after the step: ``peak_mem_gib`` and ``step_mem_gib``."""
        if self.device.type == "cuda":
            now = torch.cuda.max_memory_allocated(self.device)
        else:
            now = _resident_peak()
        self.peak = max(self.peak, now)
        step = (now - self.before) / 2**30 if self.resets else None
        return {"peak_mem_gib": self.peak / 2**30, "step_mem_gib": step}


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) * 1024


def _resident_peak() -> int:
    """Peak resident bytes since the last reset of the high-water mark (the process's, if never reset)."""
    try:
        return _proc_status_bytes("VmHWM")
    except OSError:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return rss * (1 if sys.platform == "darwin" else 1024)


def step_metrics(step: int, result: StepResult, *, step_time_s: float, tokens_per_step: int,
                 flops_per_token: int, world_size: int, peak_tflops: float | None, tokens_seen: int,
                 memory: StepMemory) -> dict:
    tokens_per_s = tokens_per_step / step_time_s
    tflops = tokens_per_s * flops_per_token / world_size / 1e12  # per device
    return {
        "step": step,
        "loss": result.loss,
        "lr": result.lr,
        "grad_norm": result.grad_norm,
        "tokens_per_s": tokens_per_s,
        "step_time_s": step_time_s,
        "tflops": tflops,
        "mfu": tflops / peak_tflops if peak_tflops else None,
        **memory.metrics(),
        "tokens_seen": tokens_seen,
        "valid_tokens": result.valid_tokens,
        "trained_tokens": result.valid_tokens,  # labels the loss counts (chat stores: answers only)
    }


class MetricsFile:
    """``metrics.jsonl``: one JSON object per logged step, flushed as written.

    Resuming after step ``k`` keeps the lines of steps ``<= k`` and drops later ones (written
    after the checkpoint by the interrupted run), so the file reads like one uninterrupted run.
    ``mesh`` (``{"dp", "cp", "ulysses", "tp"}``, :func:`megaring.train.tracking.mesh_record`) goes
    into every line, so runs of a sweep over layouts can be told apart from their files alone.
    """

    def __init__(self, path: Path, resume_step: int = 0, mesh: dict | None = None):
        self.path, self.mesh = path, mesh
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step > 0 and path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))
        self.file = open(path, "a")

    def write(self, metrics: dict) -> None:
        record = metrics | ({"mesh": self.mesh} if self.mesh else {})
        self.file.write(json.dumps(finite_json(record), allow_nan=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def finite_json(record: dict) -> dict:
    """``record`` as standard JSON: a non-finite number becomes ``null`` and ``<key>_nonfinite``
    says which (``"nan"``, ``"inf"``, ``"-inf"``)."""
    out = {}
    for key, value in record.items():
        if isinstance(value, dict):
            value = finite_json(value)
        elif isinstance(value, float) and not math.isfinite(value):
            out[f"{key}_nonfinite"] = str(value)
            value = None
        out[key] = value
    return out


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


RUN_LOG = logging.getLogger("megaring.run")  # rank 0's notes: <run dir>/train.log (see log_to_run_dir)


def log_to_run_dir(run_dir: Path) -> None:
    """Write rank 0's notes to ``<run dir>/train.log`` unless a handler (Hydra's, in a single process)
    already writes that file."""
    target = str((run_dir / "train.log").resolve())
    for logger in (logging.getLogger(), RUN_LOG):
        if any(getattr(h, "baseFilename", None) == target for h in logger.handlers):
            return
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(target)
    handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s"))
    RUN_LOG.addHandler(handler)
    RUN_LOG.setLevel(logging.INFO)


class ProgressBar:
    """tqdm on rank 0 (ETA from the step rate), and the run's notes; nothing elsewhere."""

    def __init__(self, speaks: bool, show_bar: bool, start_step: int, max_steps: int):
        self.speaks = speaks
        self.bar = (tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True)
                    if speaks and show_bar else None)

    def update(self, metrics: dict) -> None:
        if self.bar is None:
            return
        postfix = {"loss": f"{metrics['loss']:.4f}", "tok/s": f"{metrics['tokens_per_s']:.3g}"}
        if metrics["grad_norm"] is not None and math.isfinite(metrics["grad_norm"]):
            postfix["gnorm"] = f"{metrics['grad_norm']:.3f}"
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(1)

    def note(self, text: str) -> None:
        """A line for the user, above the bar, and in the run's log (rank 0 only)."""
        if not self.speaks:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)
        RUN_LOG.info(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
