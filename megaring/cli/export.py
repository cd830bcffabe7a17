"""``megaring-export``: a training checkpoint of any layout -> a Hugging Face model directory.

    megaring-export input=<run dir | checkpoint dir | step dir> output=<dir> [step=N] \\
        [dtype=bfloat16|float32] [max_shard_size=5GB] [overwrite=true]

Runs in one process without torch.distributed, whatever layout (dp, cp, tp, ZeRO 0-3) wrote the
checkpoint: it reads the checkpoint's layout-independent state (:mod:`megaring.checkpoint.universal`,
full fp32 weights under (1, 1) names, safetensors only, no pickle) and writes ``config.json``,
``generation_config.json``, safetensors shards with their index, and the tokenizer files the run
trained with. The weights stream, a chunk of rows (64 MiB) in memory at a time, whatever the
model's size. ``output`` follows the output-directory rule of :mod:`megaring.outdir`: it may not
hold or lie inside the input, and only an earlier export is replaced, with ``overwrite=true``.
Bad input (a key outside :class:`ExportConfig` too) exits with status 2 and one message naming
every problem.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megaring.checkpoint.steps import PARTIAL, read_latest, tag_for
from megaring.checkpoint.universal import UniversalError, UniversalState, UniversalWeights
from megaring.errors import problem_list
from megaring.keys import unknown_key_problems
from megaring.outdir import OutputError, output_problems

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass
class ExportConfig:
    input: str = "???"  # a run directory, its checkpoints directory, or one step_N directory
    output: str = "???"  # the Hugging Face directory to write: new, empty, or an earlier export
    step: int | None = None  # None: the checkpoint "latest" names
    dtype: str | None = None  # None: the training dtype
    max_shard_size: str = "5GB"
    overwrite: bool = False  # replace an earlier export at output (nothing else is ever replaced)


class ExportError(ValueError):
    """The export cannot run; the message names the path and what to change."""


def find_checkpoint(source: Path, step: int | None) -> Path:
    """The ``step_N`` directory to export from a run, checkpoints or step directory."""
    if source.name.endswith(PARTIAL):
        raise ExportError(f"{source} is a save that did not complete; export a complete checkpoint "
                          f"(the one 'latest' names in {source.parent})")
    if (source / "trainer_state.json").is_file() and step is None:
        return source
    for ckpt_dir in (source, source / "checkpoints"):
        if (ckpt_dir / "latest").is_file():
            tag = tag_for(step) if step is not None else read_latest(ckpt_dir)
            path = ckpt_dir / tag
            if (ckpt_dir / (tag + PARTIAL)).exists() and not path.exists():
                raise ExportError(f"{ckpt_dir / (tag + PARTIAL)} is a save that did not complete; choose another step")
            if not path.is_dir():
                kept = sorted(p.name for p in ckpt_dir.glob("step_*") if not p.name.endswith(PARTIAL))
                raise ExportError(f"{path} does not exist; {ckpt_dir} holds {kept}")
            return path
    raise ExportError(f"{source} holds no megaring checkpoint (no 'latest' in it or in {source / 'checkpoints'})")


def export(cfg: ExportConfig) -> Path:
    """Write the Hugging Face directory; returns its path."""
    from megaring.hf import write_hf_checkpoint
    from megaring.hf.export import HF_OUTPUT

    source, output = Path(cfg.input).resolve(), Path(cfg.output).resolve()
    problems = []
    if not source.exists():
        problems.append(f"input={cfg.input} does not exist")
    problems += output_problems(output, HF_OUTPUT, inputs=[source], overwrite=cfg.overwrite)
    if cfg.dtype is not None and cfg.dtype not in DTYPES:
        problems.append(f"dtype={cfg.dtype} must be one of {sorted(DTYPES)}")
    if problems:
        raise ExportError(problem_list("cannot export", problems))
    state = UniversalState(find_checkpoint(source, cfg.step))
    dtype = DTYPES[cfg.dtype or state.meta["dtype"]]
    return write_hf_checkpoint(UniversalWeights(state), state.model_config, output, dtype=dtype,
                               max_shard_size=cfg.max_shard_size, tokenizer_files=state.tokenizer_files,
                               overwrite=cfg.overwrite, inputs=[source],
                               extra_config=carried_token_ids(state.model_config.init_from))


CARRIED_IDS = ("pad_token_id", "unk_token_id")  # config.json ids megaring's model config does not hold


def carried_token_ids(init_from: str | None) -> dict:
    """The :data:`CARRIED_IDS` of the ``model.init_from`` checkpoint's config.json (when it is still there)."""
    path = Path(init_from) / "config.json" if init_from else None
    if path is None or not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # the run validated this file when it started; a changed one is not ours to report
    return {k: raw[k] for k in CARRIED_IDS if raw.get(k) is not None}


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``megaring-export key=value ...``)."""
    args = sys.argv[1:] if argv is None else argv
    usage = ("usage: megaring-export input=<run dir> output=<dir> [step=N] [dtype=bfloat16|float32] "
             "[max_shard_size=5GB] [overwrite=true]")
    not_pairs = [a for a in args if "=" not in a]
    problems = [f"{a!r} is not key=value" for a in not_pairs]
    problems += unknown_key_problems([a.split("=", 1)[0] for a in args if "=" in a], ExportConfig)
    if problems:
        print(f"megaring-export: error: {problem_list('bad arguments', problems)}\n{usage}", file=sys.stderr)
        sys.exit(2)
    try:
        cfg: ExportConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExportConfig),
                                                                OmegaConf.from_dotlist(args)))
    except OmegaConfBaseException as err:
        print(f"megaring-export: error: {err} ({usage})", file=sys.stderr)
        sys.exit(2)
    try:
        out = export(cfg)
    except (ExportError, UniversalError, OutputError, ValueError, OSError) as err:
        print(f"megaring-export: error: {err}", file=sys.stderr)
        sys.exit(2)
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out}: {', '.join(files)}")


if __name__ == "__main__":
    main()
