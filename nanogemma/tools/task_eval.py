"""`nanogemma eval --task FILE`: held-out exact match, by greedy generation through the chat template.

Each record of FILE (JSON lines, `messages` or `prompt` / `completion`, as for `nanogemma prepare`) is
split at its last assistant message: everything before it is the prompt, rendered with Gemma 3's template
and the `<start_of_turn>model\\n` header (exactly the tokens training put before that reply), and the reply
is the reference. The model continues greedily until `<end_of_turn>`; the score is the share of replies
equal to the reference after trimming whitespace, plus, when the references are JSON, the share that
parse to the same value (a looser score that forgives spacing and key order).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data.conversations import Renderer, read_records
from ..errors import NanogemmaError


@dataclass
class TaskResult:
    file: str
    records: int
    exact: int
    json_equal: int
    seconds: float
    examples: list[dict] = field(default_factory=list)  # the first few (prompt, reference, output)

    @property
    def exact_match(self) -> float:
        return self.exact / self.records

    def to_dict(self) -> dict:
        return asdict(self) | {"exact_match": self.exact_match, "json_match": self.json_equal / self.records}

    def table(self) -> str:
        return (f"{self.file}: exact match {self.exact_match:.1%} ({self.exact}/{self.records}), JSON-equal "
                f"{self.json_equal / self.records:.1%}, {self.seconds:.0f} s")


def read_task(path: str | Path) -> list[tuple[list[tuple[str, str]], str]]:
    """(prompt messages, reference reply) of every record; a bad record is an error naming its line."""
    path = Path(path)
    if not path.is_file():
        raise NanogemmaError(f"task file not found: {path}")
    out = []
    for rec in read_records(path.read_bytes()):
        if rec.error is not None:
            raise NanogemmaError(f"{path} line {rec.line}: {rec.error}")
        msgs = rec.messages
        last = max(i for i, (role, _) in enumerate(msgs) if role == "assistant")
        out.append((msgs[:last], msgs[last][1].strip()))
    if not out:
        raise NanogemmaError(f"{path} holds no records")
    return out


def prompt_ids(renderer: Renderer, messages: list[tuple[str, str]]) -> list[int]:
    """The template's tokens for `messages` (ending with a user turn) plus the model header."""
    probe = renderer.render_many([[*messages, ("assistant", "x")]])[0]
    # Everything before the probe reply's tokens (the last run of trained tokens) is the prompt, header included.
    start = len(probe.mask) - 1
    while not probe.mask[start]:
        start -= 1
    while start > 0 and probe.mask[start - 1]:
        start -= 1
    return probe.ids[:start].tolist()


def _json(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None


def evaluate_task(model, tok, path: str | Path, max_new_tokens: int = 128, batch_size: int = 8,
                  limit: int | None = None, progress: bool = False) -> TaskResult:
    """Exact match of greedy replies on the records of `path` (see the module docstring)."""
    from ..data.encoders import GemmaDataTokenizer

    records = read_task(path)[:limit]
    literal = tok.backend.encode_special_tokens
    renderer = Renderer(GemmaDataTokenizer(tok))  # message text stays text (it sets encode_special_tokens)
    try:
        return _run(model, tok, path, records, renderer, max_new_tokens, batch_size, progress)
    finally:
        tok.backend.encode_special_tokens = literal


def _run(model, tok, path, records, renderer, max_new_tokens, batch_size, progress) -> TaskResult:
    from tqdm import tqdm

    from ..decoding import SamplingParams, stop_ids_for
    from ..generation import Decoder

    stops = stop_ids_for(tok)
    exact = same = 0
    examples = []
    start = time.perf_counter()
    for b in tqdm(range(0, len(records), batch_size), disable=not progress, desc="generating", unit="batch"):
        chunk = records[b:b + batch_size]
        prompts = [prompt_ids(renderer, m) for m, _ in chunk]
        outs: list[list[int]] = [[] for _ in chunk]
        decoder = Decoder(model, prompts, max_new_tokens, SamplingParams(temperature=0.0), stops,
                          pad_id=getattr(tok, "pad_id", 0) or 0)
        for row in decoder:
            for i, t in enumerate(row):
                if t is not None:
                    outs[i].append(t)
        for (msgs, ref), ids in zip(chunk, outs, strict=True):
            text = tok.decode(ids).strip()
            exact += text == ref
            parsed = _json(ref)
            same += parsed is not None and _json(text) == parsed
            if len(examples) < 5:
                examples.append({"prompt": msgs[-1][1], "reference": ref, "output": text})
    return TaskResult(str(path), len(records), exact, same, time.perf_counter() - start, examples)
