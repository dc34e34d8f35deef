"""`nanogemma eval`: how well a model predicts held-out text — loss, perplexity and token accuracy.

The token stream (a prepared dataset's split, or raw text files tokenized with the model's own tokenizer)
is cut into consecutive windows of `seq_len + 1` tokens that overlap by one, so every token after the
first is predicted exactly once, from the up to `seq_len` tokens before it in its window:

    window k:  inputs tokens[k·S : k·S + S],  targets tokens[k·S + 1 : k·S + S + 1]

* **loss** is the mean cross-entropy in nats per predicted token;
* **perplexity** = exp(loss): the model is as unsure as if it picked uniformly among that many tokens;
* **token accuracy** is how often the most likely next token (the argmax) is the right one.

Windows restart the context, so tokens early in a window see little history: a longer `seq_len` gives a
lower (better) loss. Compare models at the same `seq_len`. Story quality, judged by another language
model, lives in `judge.py`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import NanogemmaError
from ..files import read_text


@dataclass
class LMResult:
    tokens: int  # predicted tokens
    loss: float
    perplexity: float
    accuracy: float
    seq_len: int
    source: str

    def table(self) -> str:
        from .inspect_model import format_table

        rows = [["source", self.source], ["predicted tokens", f"{self.tokens:,}"],
                ["context (seq_len)", self.seq_len], ["loss (nats/token)", f"{self.loss:.4f}"],
                ["perplexity", f"{self.perplexity:.3f}"], ["token accuracy", f"{self.accuracy:.2%}"]]
        return format_table(["metric", "value"], rows, right={1})

    def to_dict(self) -> dict:
        return asdict(self)


def load_model(name_or_path: str | None, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, path) without the tokenizer: a prepared dataset needs none, and run folders may lack one."""
    from ..flags import check_device
    from ..weights import build_model, load_state

    check_device(str(device))
    if dtype == torch.float16:
        raise NanogemmaError("float16 overflows in Gemma 3 (activations exceed 65,504): use float32 or bfloat16")
    cfg, state, path = load_state(name_or_path)
    return build_model(cfg, state, dtype=dtype, device=device, source=str(path)), Path(path)


def text_encoder(path: Path) -> Callable[[str], list[int]]:
    """text -> ids (<bos> first) with the tokenizer that comes with the model at `path`.

    GGUF files and Hugging Face folders carry one; a training run writes its data's tokenizer into the run
    folder in the Hugging Face format, so the same loader serves all three.
    """
    from ..tokenizer import load_tokenizer

    try:
        tok = load_tokenizer(path)
    except NanogemmaError as e:
        raise NanogemmaError(f"no tokenizer for raw text next to {path} ({e}); evaluate on a prepared "
                             "dataset with --data instead, or copy the tokenizer files into the folder") from None
    return lambda text: tok.encode(text, add_bos=True)


def text_tokens(files: Sequence[str | Path], encode: Callable[[str], list[int]]) -> np.ndarray:
    """Each file is one document; their ids are concatenated."""
    ids: list[int] = []
    for f in map(Path, files):
        ids += encode(read_text(f, "text file"))
    return np.asarray(ids, dtype=np.int64)


def dataset_tokens(folder: str | Path, split: str = "val") -> np.ndarray:
    """A prepared dataset's split, memory-mapped (uint16 or uint32, as its meta.json says)."""
    from ..data import read_tokens

    return read_tokens(folder, split)


def windows(n: int, seq_len: int) -> list[tuple[int, int]]:
    """(start, length) of the input windows covering a stream of n tokens; each predicts `length` tokens."""
    return [(s, min(seq_len, n - 1 - s)) for s in range(0, n - 1, seq_len)]


@torch.inference_mode()
def evaluate_lm(model, tokens: np.ndarray, seq_len: int | None = None, batch_size: int = 1,
                max_tokens: int | None = None, source: str = "tokens", progress: bool = True) -> LMResult:
    """Loss, perplexity and accuracy of `model` on a token stream (see the module docstring for the windows)."""
    cfg = model.config
    seq_len = min(512, cfg.max_seq_len) if seq_len is None else seq_len
    if not 1 <= seq_len <= cfg.max_seq_len:
        raise NanogemmaError(f"--seq-len must be between 1 and the model's context ({cfg.max_seq_len}), got {seq_len}")
    if batch_size < 1:
        raise NanogemmaError(f"--batch-size must be at least 1, got {batch_size}")
    if max_tokens is not None:
        tokens = tokens[: max_tokens + 1]
    if len(tokens) < 2:
        raise NanogemmaError(f"{source} holds {len(tokens)} token(s): at least 2 are needed to predict one")
    top = int(tokens.max())
    if top >= cfg.vocab_size:
        raise NanogemmaError(f"{source} holds token id {top}, but the model has {cfg.vocab_size} embeddings: "
                             "the data was tokenized with another tokenizer than the model's")
    spans = windows(len(tokens), seq_len)
    # Full windows batch together; the last one may be shorter and runs alone.
    full = [w for w in spans if w[1] == seq_len]
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[w] for w in spans if w[1] != seq_len]

    nll, correct, count = 0.0, 0, 0
    bar = tqdm(total=len(tokens) - 1, unit="tok", desc="eval", disable=not progress, leave=False)
    for batch in batches:
        chunk = np.stack([np.asarray(tokens[s:s + n + 1], dtype=np.int64) for s, n in batch])
        chunk = torch.from_numpy(chunk).to(model.device)
        logits = model(chunk[:, :-1])  # float32 (B, n, vocab)
        targets = chunk[:, 1:]
        nll += F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum").item()
        correct += (logits.argmax(-1) == targets).sum().item()
        count += targets.numel()
        bar.update(targets.numel())
    bar.close()
    loss = nll / count
    return LMResult(count, loss, math.exp(min(loss, 700.0)), correct / count, seq_len, source)


def write_json(path: str | Path, data: dict) -> None:
    from ..files import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
