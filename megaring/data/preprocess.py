"""``megaring-preprocess``: text, JSONL, Parquet or the stdlib corpus -> a token store directory.

    megaring-preprocess input=<file|dir|glob|stdlib> output=<dir> [workers=N]
                        [tokenizer.model=<.model | tokenizer.json | Hugging Face model dir>]

Writes ``tokens.bin``, ``tokens.idx`` (:mod:`megaring.data.store`), the tokenizer's files
(``tokenizer.model``, or ``tokenizer.json`` with ``tokenizer_config.json`` and
``special_tokens_map.json`` when present) and ``metadata.json`` by the output-directory rule of
:mod:`megaring.outdir`: into a temporary sibling renamed to ``output`` once everything is written
(removed on an error, Ctrl-C or SIGTERM); ``output`` may not hold or lie inside the input, and
an existing one is replaced only if it is an earlier token store (``metadata.json``, nothing the
command did not write) and ``overwrite=true``. A key outside :class:`PreprocessConfig` (a typo)
is an error naming the closest known key.
"""

from __future__ import annotations

import json
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from megaring.config_dir import CONFIG_DIR
from megaring.data.chat import (
    ChatSpec,
    detect_format,
    load_chat_tokenizer,
    model_directory,
    read_template,
    record_object,
)
from megaring.data.config import PreprocessConfig
from megaring.data.dataset import METADATA_NAME, open_dataset
from megaring.data.encode import EncodeSpec, batch_records, encode_stream
from megaring.data.sources import InputError, Record, Source, decode_record, resolve_sources
from megaring.data.store import StoreError, TokenStoreWriter, token_dtype
from megaring.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer, train_tokenizer
from megaring.data.tokenizer.spm import SPM_NAME
from megaring.errors import problem_list
from megaring.keys import override_keys, unknown_key_problems
from megaring.outdir import OutputError, OwnOutput, writing

MAX_REPORTED_BAD = 20  # skipped-record messages kept in metadata.json
# What a store directory holds: written here, plus the sample-index cache training adds (data.index_dir).
STORE_OUTPUT = OwnOutput("a megaring token store", markers=(METADATA_NAME,),
                         entries=(METADATA_NAME, "tokens.*", "tokenizer*", "special_tokens_map.json", "index"))


class PreprocessError(ValueError):
    """Preprocessing cannot go on; the message says why."""


def preprocess(cfg: PreprocessConfig, command_config: dict | None = None) -> dict:
    """Run the whole preprocessing; returns the summary also stored in ``metadata.json``."""
    problems = cfg.problems()
    if problems:
        raise PreprocessError(problem_list("invalid preprocess config", problems))
    sources = resolve_sources(cfg.input, cfg.max_bytes, text_key=cfg.text_key)
    with writing(cfg.output, STORE_OUTPUT, inputs=_input_paths(cfg, sources), overwrite=cfg.overwrite) as tmp:
        tokenizer = _prepare_tokenizer(cfg, sources, tmp)
        summary = _encode_all(cfg, sources, tokenizer, tmp)
        summary["config"] = command_config if command_config is not None else _plain(cfg)
        (tmp / METADATA_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _input_paths(cfg: PreprocessConfig, sources: list[Source]) -> list[Path]:
    """What the output must not hold or lie in: every input file, the given directories, the tokenizer."""
    given = [cfg.input] if isinstance(cfg.input, str) else list(cfg.input)
    paths = [Path(str(g)) for g in given if Path(str(g)).exists()]
    paths += [s.path for s in sources if isinstance(getattr(s, "path", None), Path)]
    return paths + ([Path(cfg.tokenizer.model)] if cfg.tokenizer.model else [])


def _prepare_tokenizer(cfg: PreprocessConfig, sources: list[Source], out: Path) -> Tokenizer:
    """Copy the given tokenizer's files into ``out``, or train a sentencepiece model on a sample of the input."""
    if cfg.tokenizer.model:
        return load_tokenizer(cfg.tokenizer.model).copy_to(out)
    sample = _sample_texts(sources, cfg)
    return train_tokenizer(sample, cfg.tokenizer, out / SPM_NAME, num_threads=max(1, cfg.workers))


def _sample_texts(sources: list[Source], cfg: PreprocessConfig) -> Iterator[str]:
    """Up to ``tokenizer.sample_bytes`` of document text, from the sources in a seeded random order
    (in input order when ``max_bytes`` is set).

    Unreadable records are passed over here; the encoding pass reports them.
    """
    order = list(sources)
    if not cfg.max_bytes:  # with a byte budget, sample the same prefix the encoding pass reads
        random.Random(cfg.seed).shuffle(order)
    budget = cfg.tokenizer.sample_bytes
    for record in _records(order, cfg.max_bytes):
        try:
            text = decode_record(record, cfg.text_key)
        except InputError:
            continue
        yield text[:budget]
        budget -= len(record.data)
        if budget <= 0:
            return


def _records(sources: list[Source], max_bytes: int) -> Iterator[Record]:
    """Every record of every source, stopping once ``max_bytes`` (if > 0) have been read."""
    read = 0
    for source in sources:
        for record in source.records():
            if 0 < max_bytes <= read:
                return
            read += len(record.data)
            yield record


def resolve_format(cfg: PreprocessConfig, sources: list[Source]) -> str:
    """``format``, with ``auto`` decided by the first record (chat when it carries ``messages``)."""
    if cfg.format != "auto":
        return cfg.format
    first = next(_records(sources, cfg.max_bytes), None)
    if first is None or first.kind != "json":
        return "text"
    try:
        return detect_format(record_object(first))
    except InputError:
        return "text"  # the encoding pass reports the bad line


def chat_spec(cfg: PreprocessConfig, fmt: str) -> ChatSpec | None:
    """The masked-format settings (None for text); checks up front that a chat template exists."""
    if fmt == "text":
        return None
    if not cfg.tokenizer.model:
        raise PreprocessError(f"format={fmt} needs tokenizer.model=<Hugging Face model dir>")
    template = read_template(cfg.tokenizer.chat_template)
    model_dir = str(model_directory(cfg.tokenizer.model))
    if fmt == "chat":
        load_chat_tokenizer(model_dir, template)  # a missing template fails here, naming the directory
    return ChatSpec(fmt, model_dir, template, cfg.data.train_on, cfg.max_doc_tokens)


def _encode_all(cfg: PreprocessConfig, sources: list[Source], tokenizer: Tokenizer, out: Path) -> dict:
    """Stream every record through the encoding workers into the token store."""
    dtype = token_dtype(tokenizer.vocab_size)
    fmt = resolve_format(cfg, sources)
    chat = chat_spec(cfg, fmt)
    spec = EncodeSpec(tokenizer, cfg.text_key, cfg.skip_bad_lines, dtype.str,
                      split_lines=tokenizer.splits_at_newlines, chat=chat)
    writer = TokenStoreWriter(out, dtype, with_mask=chat is not None)
    counts = {"input_bytes": 0, "empty_documents": 0, "skipped_records": 0}
    dropped = {"empty": 0, "no_assistant": 0, "too_long": 0}
    bad: list[str] = []
    start = time.perf_counter()
    bar = tqdm(unit=" docs", disable=not cfg.progress, file=sys.stderr, dynamic_ncols=True)
    with bar, writer:
        batches = batch_records(_records(sources, cfg.max_bytes), cfg.batch_bytes)
        for batch in encode_stream(batches, spec, cfg.workers):
            writer.add(batch.tokens, batch.lengths, *([] if batch.mask is None else [batch.mask]))
            dropped["empty"] += batch.empty
            for key, n in batch.dropped.items():
                dropped[key] += n
            counts["input_bytes"] += batch.input_bytes
            counts["empty_documents"] += batch.empty
            counts["skipped_records"] += len(batch.bad)
            bad.extend(batch.bad[: MAX_REPORTED_BAD - len(bad)])
            bar.update(batch.lengths.size)
            rate = writer.num_tokens / max(time.perf_counter() - start, 1e-9)
            bar.set_postfix_str(f"{writer.num_tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)
    seconds = time.perf_counter() - start
    if writer.num_documents == 0:
        raise PreprocessError(f"empty corpus: no document with text in {_describe(sources)}"
                              + (f" ({counts['skipped_records']} bad records skipped)" if bad else ""))
    return {
        "documents": writer.num_documents, "tokens": writer.num_tokens, **counts,
        "skipped_examples": bad, "seconds": round(seconds, 3),
        "tokens_per_second": round(writer.num_tokens / max(seconds, 1e-9)),
        "dtype": dtype.name, "format": fmt, "trained_tokens": writer.trained_tokens,
        **({"conversations": writer.num_documents, "dropped": dropped} if chat is not None else {}),
        "tokenizer": {**tokenizer.metadata(), "source": cfg.tokenizer.model or "trained"},
        "sources": [s.name for s in sources],
    }


def _describe(sources: list[Source]) -> str:
    names = [s.name for s in sources]
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


def _plain(cfg: PreprocessConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def summary_lines(summary: dict, output: str) -> list[str]:
    """The human-readable summary printed at the end of a run."""
    lines = [f"wrote {output}: {summary['documents']:,} documents, {summary['tokens']:,} tokens "
             f"({summary['dtype']}), vocab {summary['tokenizer']['vocab_size']:,}, "
             f"{summary['tokens_per_second']:,} tokens/s"]
    if summary["skipped_records"]:
        lines.append(f"skipped {summary['skipped_records']} bad records, e.g. {summary['skipped_examples'][0]}")
    if summary["empty_documents"]:
        lines.append(f"{summary['empty_documents']} empty documents were not stored")
    if "dropped" in summary:
        d = summary["dropped"]
        lines.append(f"{summary['format']}: {summary['conversations']:,} records, {summary['trained_tokens']:,} "
                     f"trained tokens; dropped {d['empty']} empty, {d['no_assistant']} without an assistant "
                     f"message, {d['too_long']} over max_doc_tokens")
    return lines


ConfigStore.instance().store(name="preprocess_schema", node=PreprocessConfig)


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``megaring-preprocess key=value ...``): unknown keys first, then Hydra."""
    args = sys.argv[1:] if argv is None else argv
    problems = unknown_key_problems(override_keys(args), PreprocessConfig)
    if problems:
        print(f"megaring-preprocess: error: {problem_list('unknown keys', problems)}", file=sys.stderr)
        sys.exit(2)
    sys.argv[1:] = args
    hydra_main()


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="preprocess")
def hydra_main(cfg: DictConfig) -> None:
    """The command, once Hydra composed its config."""
    if cfg.get("verify"):
        sys.exit(verify_main(cfg.verify))
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        print(f"megaring-preprocess: error: missing {', '.join(missing)} "
              "(usage: megaring-preprocess input=<file|dir|glob|stdlib> output=<dir>)", file=sys.stderr)
        sys.exit(2)
    conf: PreprocessConfig = OmegaConf.to_object(cfg)
    try:
        summary = preprocess(conf, command_config=OmegaConf.to_container(cfg))
    except (PreprocessError, InputError, TokenizerError, OutputError, OSError) as e:
        print(f"megaring-preprocess: error: {e}", file=sys.stderr)
        sys.exit(2)
    print("\n".join(summary_lines(summary, conf.output)))


def verify_main(path: str) -> int:
    """``megaring-preprocess verify=<dir>``: the full check of a store (checksums, every token id)."""
    try:
        ds = open_dataset(path, verify=True)
    except (StoreError, OSError) as e:
        print(f"megaring-preprocess: {path} failed verification: {e}", file=sys.stderr)
        return 1
    mask = ", loss mask" if ds.has_mask else ""
    print(f"{path}: ok ({ds.num_documents:,} documents, {ds.num_tokens:,} tokens; checksums{mask} and token ids "
          f"below {ds.vocab_size} verified)")
    return 0


if __name__ == "__main__":
    main()
