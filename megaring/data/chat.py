"""Chat and prompt/completion records -> token ids and a per-token loss mask.

A conversation's ids are exactly transformers' ``tokenizer.apply_chat_template(messages,
tokenize=True)`` with the checkpoint's own chat template (rendered by transformers' sandboxed
jinja2, never re-implemented here), then the end-of-document id unless they already end with it.

Trained tokens (mask 1) of assistant message ``i``: what rendering ``messages[:i+1]`` adds beyond
rendering ``messages[:i]`` with ``add_generation_prompt=True`` -- the answer and its end-of-turn
marker, never the role header. ``train_on``: ``assistant`` (every answer), ``last_assistant``
(the final one) or ``all`` (every token). The appended end-of-document id is trained when the
token before it is. A template whose renderings are not prefixes of one another is an error
naming the message index. Prompt/completion records: ``[BOS] prompt completion EOD`` with the
completion and the end-of-document id trained.

The one module of the data package that talks to ``transformers``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from megaring.data.sources import InputError, Record
from megaring.data.tokenizer import Tokenizer, TokenizerError

ROLES = ("system", "user", "assistant")


class NoAssistantError(InputError):
    """A conversation without an assistant message: nothing to train on."""


@dataclass(frozen=True)
class ChatSpec:
    """What a worker needs to encode masked records (picklable)."""

    format: str  # "chat" | "prompt_completion"
    model_dir: str | None  # the Hugging Face model directory (format=chat)
    chat_template: str | None  # template text that replaces the directory's (tokenizer.chat_template=<file>)
    train_on: str = "assistant"
    max_doc_tokens: int = 0  # longer documents are dropped and counted (0: no limit)


def model_directory(model: str) -> Path:
    """The Hugging Face model directory that ``tokenizer.model`` names (a directory or its tokenizer.json)."""
    path = Path(model)
    return path if path.is_dir() else path.parent


def load_chat_tokenizer(model_dir: str, chat_template: str | None = None):
    """transformers' tokenizer of ``model_dir`` with a chat template; :class:`TokenizerError` without one."""
    import transformers

    try:
        tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"transformers cannot load the tokenizer of {model_dir}: {e}") from e
    if chat_template is not None:
        tok.chat_template = chat_template
    if not tok.chat_template:
        raise TokenizerError(f"{model_dir} has no chat template (no chat_template.jinja, no chat_template in "
                             "tokenizer_config.json): pass tokenizer.chat_template=<jinja file>, or format=text")
    return tok


def read_template(path: str | None) -> str | None:
    """The text of ``tokenizer.chat_template=<file>`` (None: use the checkpoint's)."""
    if path is None:
        return None
    try:
        return Path(path).read_text()
    except OSError as e:
        raise TokenizerError(f"cannot read tokenizer.chat_template={path}: {e}") from e


def record_object(record: Record) -> dict:
    """The JSON object of a JSONL record; :class:`InputError` naming the line otherwise."""
    if record.kind != "json":
        raise InputError(f"{record.where}: masked formats read JSONL records, one JSON object per line")
    try:
        obj = json.loads(record.data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{record.where}: malformed JSON line ({e})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{record.where}: JSON line is {type(obj).__name__}, not an object")
    return obj


def detect_format(obj: dict) -> str:
    """``format=auto``: chat when the record carries ``messages``, prompt_completion for ``prompt``, else text."""
    if "messages" in obj:
        return "chat"
    if "prompt" in obj and "completion" in obj:
        return "prompt_completion"
    return "text"


def checked_messages(obj: dict, where: str) -> list[dict]:
    """``obj["messages"]`` checked: a list of ``{"role", "content"}`` with known roles and string content."""
    messages = obj.get("messages")
    if messages is None:
        raise InputError(f"{where}: record has no 'messages' field (format=chat reads "
                         '{"messages": [{"role": ..., "content": ...}, ...]})')
    if not isinstance(messages, list):
        raise InputError(f"{where}: 'messages' is {type(messages).__name__}, not a list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise InputError(f"{where}: message {i} is not an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise InputError(f"{where}: message {i} has role {m['role']!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise InputError(f"{where}: message {i} content is {type(m['content']).__name__}, not a string")
    if messages and not any(m["role"] == "assistant" for m in messages):
        raise NoAssistantError(f"{where}: conversation has no assistant message (nothing to train on)")
    return messages


def _render(tok, messages: list[dict], generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                  return_dict=False)
    return [int(i) for i in ids]


def chat_ids(tok, messages: list[dict], train_on: str, eod_id: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids (T,), mask (T,) uint8) of one conversation by the incremental-rendering rule."""
    full = _render(tok, messages, False)
    mask = np.zeros(len(full), np.uint8)
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if train_on == "last_assistant":
        answers = answers[-1:]
    for i in answers if train_on != "all" else []:
        before, through = _render(tok, messages[:i], True), _render(tok, messages[: i + 1], False)
        if through[: len(before)] != before or full[: len(through)] != through:
            raise InputError(f"{where}: message {i}: the chat template's renderings are not prefixes of one another "
                             f"(messages[:{i}] with add_generation_prompt=True, messages[:{i + 1}], all messages), "
                             "so its trained tokens are undefined; use a template that renders turns in order")
        mask[len(before):len(through)] = 1
    if train_on == "all":
        mask[:] = 1
    if not full or full[-1] != eod_id:
        full.append(eod_id)
        mask = np.append(mask, mask[-1] if mask.size else 0)
    return np.asarray(full, np.int64), mask


def prompt_completion_ids(tokenizer: Tokenizer, obj: dict, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(ids, mask) of ``[BOS] prompt completion EOD``; the completion and EOD are trained."""
    for key in ("prompt", "completion"):
        if not isinstance(obj.get(key), str):
            raise InputError(f"{where}: field {key!r} is missing or not a string (format=prompt_completion)")
    prompt, completion = tokenizer.encode_batch([obj["prompt"], obj["completion"]])
    head = ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + [int(i) for i in prompt]
    ids = np.asarray(head + [int(i) for i in completion] + [tokenizer.eod_id], np.int64)
    mask = np.zeros(ids.size, np.uint8)
    mask[len(head):] = 1
    return ids, mask
