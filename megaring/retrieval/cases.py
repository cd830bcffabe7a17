"""Retrieval cases: a key hidden at a depth of a long context, the question, then the answer.

A case is ``length`` token ids whose last tokens are the answer; its score is the fraction of the
answer's tokens that the model predicts greedily from everything before them (teacher-forced, one
forward pass: no generation loop). Positions ``length - n - 1 .. length - 2`` are labelled with the
``n`` answer tokens; nothing else is scored.

- ``passkey``: a seeded random number (``key_digits`` digits) in repeated filler sentences, asked
  for at the end (the passkey retrieval test of Mohtashami & Jaggi, 2023).
- ``needle``: a fact "the special magic number for <name> is <number>" inside real text (the
  token ids of ``data.path``, in store order), with ``distractors`` other facts of the same form at
  seeded random depths (multi-needle, as EasyContext and RULER), the question asking for one name.

The filler or haystack is cut to the exact length; the key goes in at ``depth`` of it (0: right
after the instruction, 1: right before the question), at a sentence boundary for passkey. The
pieces are encoded one by one and joined as ids, so every length is exact whatever the tokenizer;
``chat=true`` renders the instruction, context and question as the user message of the
checkpoint's chat template with the generation prompt, and the answer follows it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megaring.errors import BadInput

RETRIEVAL_TASKS = ("passkey", "needle")

PASSKEY_INTRO = ("A number is hidden somewhere in the long text below. Find it and keep it in mind: "
                 "you will be asked for it at the end.")
PASSKEY_FILLER = " The river runs down to the sea. The hills are quiet today. Rain falls and the fields grow."
PASSKEY_NEEDLE = " The pass key is {key}. Keep it in mind. {key} is the pass key."
PASSKEY_QUESTION = " What is the pass key? The pass key is"

NEEDLE_INTRO = "Some special magic numbers are hidden in the text below. Remember them: you will be asked for one."
NEEDLE_FACT = " The special magic number for {name} is: {number}."
NEEDLE_QUESTION = " What is the special magic number for {name}? The special magic number for {name} is:"
NAMES = ("Lisbon", "Nairobi", "Osaka", "Quito", "Tromso", "Hobart", "Lagos", "Tbilisi", "Recife", "Kazan",
         "Dakar", "Bergen", "Cusco", "Hanoi", "Perth", "Malmo")


class CaseError(BadInput):
    """A case cannot be built as configured; the message says what to change."""


@dataclass(frozen=True)
class Case:
    task: str
    length: int
    depth: float
    sample: int
    ids: np.ndarray  # (length,) int64: the model's input; its last ``answer_len`` ids are the answer
    answer_len: int

    def record(self) -> dict:
        """The case as saved by ``save_cases=true``: enough for any tool to rescore it."""
        return {"task": self.task, "length": self.length, "depth": self.depth, "sample": self.sample,
                "answer_len": self.answer_len, "input_ids": [int(i) for i in self.ids]}


@dataclass(frozen=True)
class Encoder:
    """Text -> ids for the cases: the tokenizer's ``encode`` (no BOS), its BOS id, and with a chat
    template the ids before and after the user message (``wrap``)."""

    encode: Callable[[str], list[int]]
    bos_id: int | None
    chat: tuple[list[int], list[int]] | None = None  # (before the user content, after it up to the answer)

    def frame(self, intro: list[int]) -> tuple[list[int], list[int]]:
        """(ids before the context, ids between the question and the answer)."""
        if self.chat is not None:
            before, after = self.chat
            return before + intro, after
        return ([self.bos_id] if self.bos_id is not None else []) + intro, []


def chat_encoder(model_dir: str, encode: Callable[[str], list[int]], bos_id: int | None) -> Encoder:
    """An :class:`Encoder` whose cases sit in the chat template of ``model_dir`` (transformers renders it)."""
    from megaring.data.chat import load_chat_tokenizer

    tok = load_chat_tokenizer(model_dir)
    marker = "\x00CASE\x00"
    text = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False, add_generation_prompt=True)
    before, found, after = text.partition(marker)
    if not found:
        raise CaseError(f"the chat template of {model_dir} does not place the user message verbatim; use chat=false")
    ids = lambda t: [int(i) for i in tok(t, add_special_tokens=False)["input_ids"]] if t else []  # noqa: E731
    return Encoder(encode, bos_id, (ids(before), ids(after)))


def case_key(seed: int, task: str, length: int, depth: float, sample: int) -> np.random.Generator:
    """The case's own generator: the same case at any layout, in any order, on any rank."""
    return np.random.default_rng([seed, RETRIEVAL_TASKS.index(task), length, round(depth * 10_000), sample])


def _fit(length: int, fixed: int, what: str) -> int:
    room = length - fixed
    if room < 1:
        raise CaseError(f"a {what} case of {length} tokens leaves no room for its context (the instruction, key, "
                        f"question and answer take {fixed} tokens): use lengths of at least {fixed + 1}")
    return room


def passkey_case(enc: Encoder, length: int, depth: float, sample: int, *, seed: int, key_digits: int) -> Case:
    rng = case_key(seed, "passkey", length, depth, sample)
    key = str(int(rng.integers(10 ** (key_digits - 1), 10 ** key_digits)))
    head, tail = enc.frame(enc.encode(PASSKEY_INTRO))
    needle = enc.encode(PASSKEY_NEEDLE.format(key=key))
    question, answer = enc.encode(PASSKEY_QUESTION), enc.encode(" " + key)
    room = _fit(length, len(head) + len(needle) + len(question) + len(tail) + len(answer), "passkey")
    unit = enc.encode(PASSKEY_FILLER)
    filler = np.tile(np.asarray(unit, np.int64), -(-room // len(unit)))[:room]
    at = min(room, len(unit) * round(depth * room / len(unit)))  # a sentence boundary (or the very end)
    ids = np.concatenate([head, filler[:at], needle, filler[at:], question, tail, answer]).astype(np.int64)
    return Case("passkey", length, depth, sample, ids, len(answer))


def needle_case(enc: Encoder, haystack: np.ndarray, length: int, depth: float, sample: int, *, seed: int,
                distractors: int) -> Case:
    rng = case_key(seed, "needle", length, depth, sample)
    names = [NAMES[i] for i in rng.choice(len(NAMES), size=distractors + 1, replace=False)]
    numbers = [str(int(n)) for n in rng.integers(1_000_000, 10_000_000, size=distractors + 1)]
    facts = [enc.encode(NEEDLE_FACT.format(name=n, number=v)) for n, v in zip(names, numbers)]
    head, tail = enc.frame(enc.encode(NEEDLE_INTRO))
    question, answer = enc.encode(NEEDLE_QUESTION.format(name=names[0])), enc.encode(" " + numbers[0])
    fixed = len(head) + sum(map(len, facts)) + len(question) + len(tail) + len(answer)
    room = _fit(length, fixed, "needle")
    if len(haystack) < room:
        raise CaseError(f"a needle case of {length} tokens needs {room} haystack tokens and data.path holds "
                        f"{len(haystack)}: use a larger store or shorter lengths")
    text = haystack[:room]
    depths = [depth, *rng.uniform(0.0, 1.0, size=distractors)]
    places = sorted((round(d * room), i) for i, d in enumerate(depths))  # the asked fact first among equals
    parts, last = [head], 0
    for at, i in places:
        parts += [text[last:at], facts[i]]
        last = at
    parts += [text[last:], question, tail, answer]
    ids = np.concatenate([np.asarray(p, np.int64) for p in parts]).astype(np.int64)
    return Case("needle", length, depth, sample, ids, len(answer))


def build_cases(task: str, enc: Encoder, settings, haystack: np.ndarray | None = None) -> list[Case]:
    """Every case of ``task``: lengths x depths x samples, in that order."""
    out = []
    for length in settings.lengths:
        for depth in settings.depths:
            for sample in range(settings.samples):
                if task == "passkey":
                    out.append(passkey_case(enc, length, depth, sample, seed=settings.seed,
                                            key_digits=settings.key_digits))
                else:
                    out.append(needle_case(enc, haystack, length, depth, sample, seed=settings.seed,
                                           distractors=settings.distractors))
    return out


def write_cases(path: Path, cases: Sequence[Case], scores: Sequence[float], predicted: Sequence[list[int]]) -> None:
    """``save_cases=true``: one JSON line per case, with the score megaring gave it and the tokens it
    predicted for the answer (``input_ids[-answer_len:]``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for case, score, guess in zip(cases, scores, predicted):
            fh.write(json.dumps(case.record() | {"score": float(score), "predicted": guess}) + "\n")


def cell_records(task: str, cases: Sequence[Case], scores: Sequence[float]) -> list[dict]:
    """One record per (length, depth): the mean score of its cases."""
    cells: dict[tuple[int, float], list[float]] = {}
    for case, score in zip(cases, scores):
        cells.setdefault((case.length, case.depth), []).append(float(score))
    return [{"task": task, "length": length, "depth": depth, "score": float(np.mean(s)), "cases": len(s)}
            for (length, depth), s in cells.items()]
