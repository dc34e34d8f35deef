"""Batches from the memory-mapped token files: random windows for training, fixed ones for validation.

**Training windows.** A window is `seq_len + 1` consecutive tokens at a random offset of `train.bin`:
inputs are its first `seq_len` tokens, targets the last `seq_len` (each input's next token). Offsets are
drawn uniformly from [0, N − seq_len − 1] — there is no list of all offsets (which for a 10B-token corpus
would be 80 GB) and no epoch to shuffle, only a generator.

The generator of optimizer step s is seeded with (seed, s): the offsets of any step can be recomputed
from those two numbers alone. So the sampler's checkpoint state is just that pair, a resumed run draws
exactly the batches the uninterrupted run would have drawn, and every process of a distributed run draws
the same step-wide set and takes its own share (see `distributed.py`).

**Validation windows** are chosen once and reused at every evaluation, so successive validation losses
differ only because the model changed. They begin at document boundaries — at the end-of-text token
before a document (or its <bos>, in Gemma-tokenized data), so the model sees each document from its start,
the way the synthetic corpus's entropy floor is defined — spread evenly over `val.bin`; without enough
boundaries they are simply spread evenly.

**Chat data** (a folder with loss masks, `nanogemma prepare` on conversations) is not cut at random
offsets: a conversation cut from its start would lose the question its reply answers. Whole
conversations are *packed* into rows of `seq_len` instead: each epoch is a permutation of the
conversations (seeded by (seed, epoch)), laid into rows in that order, a new row whenever the next one
does not fit. Each conversation's positions restart at 0, which the model reads as a document boundary
that attention does not cross (`attention.py`), so a packed token sees exactly what it would see alone.
Targets that the mask does not train, each conversation's last token and the padding that fills a row
are `IGNORE` (-100), which the losses skip. Step s takes rows [s·R, (s+1)·R) of the stream of epochs, so
the rows of any step are again a pure function of (seed, step). Validation uses the conversations in
file order, packed the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import load_data_tokenizer, read_meta, read_tokens, verify
from ..data.encoders import DataTokenizer
from ..data.store import check_ids, read_mask
from ..errors import NanogemmaError


@dataclass
class Dataset:
    folder: Path
    meta: dict
    train: np.ndarray
    val: np.ndarray
    tokenizer: DataTokenizer
    train_mask: np.ndarray | None = None  # chat data: 1 = a trained target (see `Packing`)
    val_mask: np.ndarray | None = None

    @property
    def packed(self) -> bool:
        """Chat data: whole conversations packed into rows, loss on the masked targets only."""
        return self.train_mask is not None

    @property
    def vocab_size(self) -> int:
        return int(self.meta["tokenizer"]["vocab_size"])

    @property
    def eot_id(self) -> int:
        return int(self.meta["tokenizer"]["eot_id"])

    @property
    def bos_id(self) -> int | None:
        b = self.meta["tokenizer"].get("bos_id")
        return None if b is None else int(b)

    @property
    def spec(self) -> str:
        return str(self.meta["tokenizer"]["spec"])

    def describe(self) -> dict:
        """What a checkpoint records about its data."""
        return {"folder": str(self.folder), "tokenizer": self.spec, "vocab_size": self.vocab_size,
                "train_tokens": len(self.train), "val_tokens": len(self.val),
                "entropy_floor": self.entropy_floor}

    @property
    def entropy_floor(self) -> float | None:
        """The synthetic corpus's best possible loss in nats/token (None for real text)."""
        syn = self.meta.get("synthetic")
        return None if not syn else float(syn["entropy_nats_per_token"])


def open_dataset(folder: str | Path, seq_len: int, checksums: bool = False) -> Dataset:
    """The prepared folder, checked before any step: each file's size and type against meta.json (in
    `read_tokens`), every id against the vocabulary, and with `checksums` every byte against its SHA-256."""
    folder = Path(folder)
    meta = read_meta(folder)
    if checksums:
        verify(folder)
    train, val = read_tokens(folder, "train"), read_tokens(folder, "val")
    tok = meta.get("tokenizer")
    if not isinstance(tok, dict) or not isinstance(tok.get("vocab_size"), int) or "eot_id" not in tok:
        raise NanogemmaError(f"{folder / 'meta.json'} is damaged: no tokenizer vocab_size / eot_id; prepare the "
                             "folder again with --overwrite")
    for split, tokens in (("train", train), ("val", val)):
        check_ids(tokens, tok["vocab_size"], str(folder / f"{split}.bin"))
    masks = read_mask(folder, "train"), read_mask(folder, "val")
    for split, tokens in (("train", train), ("val", val)) if masks[0] is None else ():  # packed rows are padded
        if len(tokens) < seq_len + 1:
            raise NanogemmaError(f"{folder}: the {split} split has {len(tokens):,} tokens, fewer than one window "
                                 f"of seq_len + 1 = {seq_len + 1}; lower --seq-len or prepare more data")
    if masks[0] is not None:
        longest = int(meta.get("chat", {}).get("longest", 0))
        if longest > seq_len:
            raise NanogemmaError(f"{folder}: the longest conversation has {longest:,} tokens, more than seq_len "
                                 f"{seq_len}: raise --seq-len, or prepare the data with --context {seq_len}")
    return Dataset(folder, meta, train, val, load_data_tokenizer(folder=folder), *masks)


class WindowSampler:
    """Offsets of training windows, a pure function of (seed, step)."""

    def __init__(self, n_tokens: int, seq_len: int, seed: int) -> None:
        self.n_tokens, self.seq_len, self.seed = n_tokens, seq_len, seed
        self.high = n_tokens - seq_len  # number of valid offsets: a window needs seq_len + 1 tokens

    def offsets(self, step: int, count: int) -> np.ndarray:
        """`count` window offsets for optimizer step `step` (the same on every call and every process)."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, self.high, size=count, dtype=np.int64)

    def state_dict(self, step: int) -> dict:
        return {"kind": "uniform-windows", "seed": self.seed, "step": step, "n_tokens": self.n_tokens,
                "seq_len": self.seq_len}

    def check_resumable(self, saved: dict) -> None:
        for key in ("seed", "n_tokens", "seq_len"):
            if saved.get(key) != getattr(self, key):
                what = "the training data changed" if key == "n_tokens" else f"{key} changed"
                raise NanogemmaError(f"cannot resume exactly: {what} since the checkpoint ({key} "
                                     f"{saved.get(key)} -> {getattr(self, key)}); use the run's own data and settings")


def windows(tokens: np.ndarray, offsets: np.ndarray, seq_len: int, device: torch.device,
            bos_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (len(offsets), seq_len) int64, from windows at `offsets`.

    With `bos_id`, every window's first input is <bos>: Gemma models are trained with <bos> at position 0
    and misbehave without it (it is where attention rests when nothing else is relevant), so a window cut
    mid-document starts with <bos> in place of its first token. Windows at document starts already do.
    """
    idx = offsets[:, None] + np.arange(seq_len + 1)
    w = torch.from_numpy(tokens[idx].astype(np.int64))  # fancy indexing reads only these tokens of the memmap
    if bos_id is not None:
        w[:, 0] = bos_id
    if device.type == "cuda":
        w = w.pin_memory().to(device, non_blocking=True)
    else:
        w = w.to(device)
    return w[:, :-1], w[:, 1:]


def validation_offsets(tokens: np.ndarray, seq_len: int, count: int, start_id: int | None) -> np.ndarray:
    """`count` fixed offsets for validation windows (see the module docstring); `start_id` marks where a
    document starts (<bos> in Gemma-tokenized data, else the end-of-text token before each document)."""
    high = len(tokens) - seq_len
    if start_id is not None:
        starts = np.flatnonzero(np.asarray(tokens[:high]) == start_id)
        if len(starts) >= count:
            return starts[np.linspace(0, len(starts) - 1, count).round().astype(np.int64)]
    return np.linspace(0, high - 1, count).round().astype(np.int64)


IGNORE = -100  # a target the loss skips (torch's cross_entropy default ignore_index)


class Packing:
    """Whole documents (each starting with <bos>) packed into rows of `seq_len`; see the module docstring."""

    def __init__(self, tokens: np.ndarray, mask: np.ndarray, bos_id: int, seq_len: int, seed: int,
                 shuffle: bool = True) -> None:
        starts = np.flatnonzero(np.asarray(tokens) == bos_id)
        if len(starts) == 0 or starts[0] != 0:
            raise NanogemmaError("chat data must start every conversation with <bos>; prepare it again")
        self.tokens, self.mask, self.seq_len, self.seed, self.shuffle = tokens, mask, seq_len, seed, shuffle
        self.starts = starts
        self.lengths = np.diff(np.append(starts, len(tokens)))
        self.n_tokens = len(tokens)
        self._epochs: list[list[list[int]]] = []  # rows (lists of document indices) of each epoch

    def epoch_rows(self, epoch: int) -> list[list[int]]:
        while len(self._epochs) <= epoch:
            e = len(self._epochs)
            order = (np.random.default_rng([self.seed, e]).permutation(len(self.starts)) if self.shuffle
                     else np.arange(len(self.starts)))
            rows, row, used = [], [], 0
            for d in order.tolist():
                n = int(self.lengths[d])
                if used + n > self.seq_len:
                    rows.append(row)
                    row, used = [], 0
                row.append(d)
                used += n
            rows.append(row)
            self._epochs.append(rows)
        return self._epochs[epoch]

    def row(self, index: int) -> list[int]:
        """Row `index` of the stream of epochs."""
        epoch = 0
        while index >= len(self.epoch_rows(epoch)):
            index -= len(self.epoch_rows(epoch))
            epoch += 1
        return self.epoch_rows(epoch)[index]

    def batch(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(inputs, targets, positions), each (len(rows), seq_len) int64, for the rows with these indices."""
        T = self.seq_len
        x = np.zeros((len(rows), T), dtype=np.int64)
        y = np.full((len(rows), T), IGNORE, dtype=np.int64)
        pos = np.zeros((len(rows), T), dtype=np.int64)
        for r, index in enumerate(rows.tolist()):
            at = 0
            for d in self.row(int(index)):
                s, n = int(self.starts[d]), int(self.lengths[d])
                ids = np.asarray(self.tokens[s:s + n], dtype=np.int64)
                x[r, at:at + n] = ids
                keep = np.asarray(self.mask[s + 1:s + n]).astype(bool)
                y[r, at:at + n - 1] = np.where(keep, ids[1:], IGNORE)
                pos[r, at:at + n] = np.arange(n)
                at += n
            pos[r, at:] = np.arange(T - at)  # the padding: a document of its own, never a target
        out = [torch.from_numpy(a).to(device) for a in (x, y, pos)]
        return out[0], out[1], out[2]


class PackedSampler:
    """Row indices of each step for packed data: rows [step·count, (step+1)·count) of the epoch stream."""

    def __init__(self, packing: Packing) -> None:
        self.packing = packing
        self.n_tokens, self.seq_len, self.seed = packing.n_tokens, packing.seq_len, packing.seed

    def offsets(self, step: int, count: int) -> np.ndarray:
        return np.arange(step * count, (step + 1) * count, dtype=np.int64)

    def state_dict(self, step: int) -> dict:
        return {"kind": "packed-documents", "seed": self.seed, "step": step, "n_tokens": self.n_tokens,
                "seq_len": self.seq_len}

    check_resumable = WindowSampler.check_resumable
