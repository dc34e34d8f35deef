"""Chat and instruction data: JSON lines of conversations -> Gemma 3's chat template, tokens and a loss mask.

Each line of a `.jsonl` file is one record, in either form

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}, ...]}
    {"prompt": "...", "completion": "..."}          (a user turn and the model's answer)

(`content` may also be a list of `{"type": "text", "text": ...}` parts; `prompt` and `completion` may be
lists of messages.) A conversation is rendered as Gemma 3's official template renders it:

    <bos><start_of_turn>user
    {system}\\n\\n{first user message}<end_of_turn>
    <start_of_turn>model
    {reply}<end_of_turn>
    ...

— one `<bos>` per conversation, the system prompt (not trimmed) folded into the first user turn, every
message trimmed, roles alternating user / assistant after the system prompt. Special tokens are inserted
by id and the text between them is tokenized as text, so a message that spells "<end_of_turn>" cannot
close its turn (transformers would read it as the special token; the tests use conversations without).

The **loss mask** is 1 on the tokens the model must learn to produce: each reply and the `<end_of_turn>`
that closes it (so the fine-tuned model learns to stop). Headers, user turns and the system prompt are 0.

**Bad records** — not JSON, a missing or unknown role, roles out of order, empty or non-text content, no
reply to learn from, or a conversation longer than `context` tokens — are skipped whole (never half
written), counted and listed by file and line in meta.json and on stderr.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

ROLES = ("system", "user", "assistant")
HEADER = {"user": "user", "assistant": "model"}  # Gemma calls the assistant "model"


class BadRecord(ValueError):
    """A record that cannot be rendered; the message says why."""


@dataclass
class Rendered:
    ids: np.ndarray
    mask: np.ndarray  # uint8, 1 = a target the loss trains on


def _text(content: object, where: str) -> str:
    """A message's content as a string: a string, or a list of text parts (joined, each trimmed)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRecord(f"{where}: content part of type {kind!r} (only text parts are supported)")
            parts.append(part["text"].strip())
        return "".join(parts)
    if content is None:
        raise BadRecord(f"{where} has no content")
    raise BadRecord(f"{where}: content is {type(content).__name__}, not text")


def messages_of(record: object) -> list[tuple[str, str]]:
    """The (role, content) messages of a parsed record, checked; raises BadRecord."""
    if not isinstance(record, dict):
        raise BadRecord(f"a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        raw = record["messages"]
        if not isinstance(raw, list):
            raise BadRecord(f"'messages' is {type(raw).__name__}, not a list")
    elif "prompt" in record and "completion" in record:
        p, c = record["prompt"], record["completion"]
        raw = ((p if isinstance(p, list) else [{"role": "user", "content": p}])
               + (c if isinstance(c, list) else [{"role": "assistant", "content": c}]))
    else:
        raise BadRecord("neither 'messages' nor 'prompt' and 'completion'")
    out = []
    for i, m in enumerate(raw, 1):
        where = f"message {i}"
        if not isinstance(m, dict):
            raise BadRecord(f"{where} is {type(m).__name__}, not an object")
        role = m.get("role")
        if role not in ROLES:
            raise BadRecord(f"{where} has no role" if role is None else
                            f"{where} has role {role!r} (use system, user or assistant)")
        text = _text(m.get("content"), where)
        if not text.strip():
            raise BadRecord(f"{where} ({role}) is empty")
        out.append((role, text))
    if not out:
        raise BadRecord("no messages")
    turns = out[1:] if out[0][0] == "system" else out
    for i, (role, _) in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if role != want:
            n = i + 1 + (len(out) - len(turns))
            raise BadRecord(f"message {n} is {role}, expected {want} (after an optional system prompt, roles "
                            "alternate user, assistant, ...)")
    if not any(role == "assistant" for role, _ in turns):
        raise BadRecord("no assistant reply to learn from")
    return out


def pieces(messages: list[tuple[str, str]]) -> list[tuple]:
    """The template as pieces, in order: ("special", name, trained), ("turn", header, body, trained) or
    ("text", text). The system prompt goes before the first user message; see the module docstring."""
    system = ""
    if messages[0][0] == "system":
        system, messages = messages[0][1] + "\n\n", messages[1:]
    out: list[tuple] = [("special", "<bos>", False)]
    for i, (role, text) in enumerate(messages):
        reply = role == "assistant"
        out += [("special", "<start_of_turn>", False),
                ("turn", HEADER[role] + "\n", (system if i == 0 else "") + text.strip(), reply),
                ("special", "<end_of_turn>", reply), ("text", "\n")]
    return out


class Renderer:
    """Conversations -> (ids, mask) with a Gemma tokenizer (`encode_batch` of plain text, special ids by name)."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.special = {}
        for name in ("<bos>", "<start_of_turn>", "<end_of_turn>"):
            i = tok.backend.token_to_id(name)
            if i is None:
                raise ValueError(f"the tokenizer has no {name} token: chat data needs Gemma's tokenizer")
            self.special[name] = i

    def render_many(self, conversations: list[list[tuple[str, str]]]) -> list[Rendered]:
        """Render a batch (one tokenizer call for all of its text)."""
        plan = [pieces(m) for m in conversations]
        # A turn's header and body are one text for the tokenizer, as in the template's output; the header
        # is also encoded alone, to find where the body's tokens begin.
        texts: list[str] = []
        for ps in plan:
            for p in ps:
                if p[0] == "turn":
                    texts += [p[1], p[1] + p[2]]
                elif p[0] == "text":
                    texts.append(p[1])
        encoded = iter(self.tok.encode_batch(texts))
        out = []
        for ps in plan:
            ids: list[int] = []
            mask: list[int] = []
            for p in ps:
                if p[0] == "special":
                    ids.append(self.special[p[1]])
                    mask.append(int(p[2]))
                elif p[0] == "turn":
                    head, both = next(encoded), next(encoded)
                    k = 0
                    while k < min(len(head), len(both)) and head[k] == both[k]:
                        k += 1
                    ids += both
                    mask += [0] * k + [int(p[3])] * (len(both) - k)
                else:
                    piece = next(encoded)
                    ids += piece
                    mask += [0] * len(piece)
            out.append(Rendered(np.array(ids, dtype=np.int64), np.array(mask, dtype=np.uint8)))
        return out


@dataclass
class LineResult:
    line: int
    messages: list[tuple[str, str]] | None
    error: str | None
    raw: bytes


def read_records(data: bytes, first_line: int = 1) -> Iterator[LineResult]:
    """Parse JSON lines (blank lines are skipped, not errors), each checked by `messages_of`."""
    for n, raw in enumerate(data.split(b"\n"), first_line):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            yield LineResult(n, None, f"not valid JSON ({e.msg if hasattr(e, 'msg') else e})", raw)
            continue
        try:
            yield LineResult(n, messages_of(record), None, raw)
        except BadRecord as e:
            yield LineResult(n, None, str(e), raw)


def looks_like_chat(first_line: bytes, text_column: str) -> bool:
    """Whether a JSON lines file holds conversations (judged by its first record)."""
    try:
        record = json.loads(first_line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(record, dict) and text_column not in record and (
        "messages" in record or ("prompt" in record and "completion" in record))
