"""`nanogemma prepare`: any text source to `train.bin`, `val.bin` and `meta.json`.

The pipeline: the source is cut into chunks (`chunks.py`) in the main process; a pool of worker processes
reads each chunk (decoding, splitting into documents), tokenizes its documents and returns one array of
ids per split; the main process writes the arrays in chunk order. At most a few chunks per worker are in
flight, so memory stays bounded whatever the corpus size, and the output does not depend on the number
of workers.

Each worker loads the tokenizer once. On Linux the workers are forked after the tokenizer is loaded, so
they share it and start instantly; elsewhere each loads it from the files saved in the staging folder.

Validation: the source's own split when it has one; otherwise every training document whose keyed BLAKE2b
hash falls in the lowest `val_fraction` of the range goes to validation. The rule depends only on the
text and the seed, so it is the same whatever the order or chunking, and copies of a document always land
in the same split.

Safety against interruption and re-runs is the job of `store.py`.

**Chat data.** JSON lines of conversations (`messages`, or `prompt` / `completion`: see `conversations.py`)
are rendered with Gemma 3's chat template instead, in the main process (instruction sets are small next to
pretraining corpora), and each split gets a loss mask beside its tokens (`train.mask.bin`, one uint8 per
token: 1 where the model's replies are). Bad records are skipped whole and listed by line in meta.json.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import re
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import NanogemmaError
from ..files import OutputLock
from . import store
from .chunks import split_file
from .encoders import BPE_FILE, DataTokenizer, load_gemma, load_gpt2, load_saved, parse_spec, train_bpe
from .sources import DEFAULT_SOURCE, LocalSource, Source, SyntheticSource, open_source

FORMATS = ("auto", "text", "chat")
DEFAULT_CONTEXT = 2048  # chat data: the longest conversation kept, in tokens
MAX_LISTED = 100  # bad records listed in meta.json (all are counted)

FORMAT_VERSION = 1
TRAIN, VAL, HOLDOUT = "train", "val", "holdout"  # where a chunk's documents go


def _warn(message: str) -> None:
    print(f"nanogemma: warning: {message}", file=sys.stderr)


@dataclass
class Encoded:
    """A worker's answer for one chunk."""

    origin: str
    train: np.ndarray
    val: np.ndarray
    train_docs: int
    val_docs: int
    bad_bytes: int
    empty: int
    size: int = 0  # input bytes of the chunk, where known (the progress bar's unit)


@dataclass
class PrepareResult:
    folder: Path
    meta: dict
    skipped: bool  # the folder was already prepared with the same arguments
    seconds: float = 0.0
    tokens_per_second: float = 0.0


# ---- workers ----------------------------------------------------------------------------------------

_worker: dict = {}  # per process: "ref" (spec, folder, file names) and "tok" once loaded


def _init_worker(ref: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes
    if sys.platform.startswith("linux"):
        try:  # die with the main process even if it is killed outright
            import ctypes

            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
    if _worker.get("ref") != ref:  # forked children inherit the loaded tokenizer; others load it lazily
        _worker.clear()
        _worker["ref"] = ref


def _tokenizer() -> DataTokenizer:
    if "tok" not in _worker:
        spec, folder, names = _worker["ref"]
        _worker["tok"] = load_saved(spec, Path(folder), list(names))
    return _worker["tok"]


def held_out(text: str, key: bytes, threshold: int) -> bool:
    """Whether a document goes to the held-out validation split."""
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=key).digest()
    return int.from_bytes(digest, "little") < threshold


def _encode(task: tuple) -> Encoded:
    chunk, target, key, threshold = task
    docs = chunk.read()
    tok = _tokenizer()
    empty = np.zeros(0, dtype=tok.dtype)
    if target == HOLDOUT:
        train, val = [], []
        for t in docs.texts:
            (val if held_out(t, key, threshold) else train).append(t)
    else:
        train, val = (docs.texts, []) if target == TRAIN else ([], docs.texts)
    return Encoded(chunk.origin, tok.encode_documents(train) if train else empty,
                   tok.encode_documents(val) if val else empty, len(train), len(val), docs.bad_bytes, docs.empty,
                   len(getattr(chunk, "data", b"")))


def _ordered(pool, tasks: Iterable[tuple], window: int) -> Iterator[Encoded]:
    """Results in task order, with at most `window` tasks in flight (so memory stays bounded)."""
    if pool is None:
        yield from map(_encode, tasks)
        return
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.apply_async(_encode, (task,)))
        if len(pending) >= window:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ---- the pipeline -----------------------------------------------------------------------------------

def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def default_out(source: str | list[str] | None, tokenizer: str) -> Path:
    """data/<source>-<tokenizer>, e.g. data/tinystories-gpt2, data/synthetic-10000-bpe512."""
    spec = (source if isinstance(source, str) else (source or [DEFAULT_SOURCE])[0]).removeprefix("hf:")
    name = spec.replace(":", "-") if spec.startswith("synthetic:") else Path(spec.rstrip("/")).name
    name = re.sub(r"\.(txt|jsonl|parquet)(\.gz)?$", "", name.lower())
    slug = re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "data"
    return Path("data") / f"{slug}-{re.sub(r'[^a-z0-9]+', '', tokenizer.lower())}"


def prepare(source: str | list[str] | None = None, out: str | Path | None = None, tokenizer: str = "gpt2", *,
            tokenizer_file: str | Path | None = None, text_column: str = "text", delimiter: str | None = None,
            split: str = "train", val_split: str | None = None, hf_config: str | None = None,
            val_fraction: float = 0.01, seed: int = 0, workers: int | None = None, overwrite: bool = False,
            progress: bool = False, warn: Callable[[str], None] = _warn, glob: str | None = None,
            format: str = "auto", context: int = DEFAULT_CONTEXT) -> PrepareResult:
    """Tokenize `source` into `out` (see the module docstring and `nanogemma prepare --help`).

    `format`: "text", "chat" (JSON lines of conversations), or "auto" (chat when the first record of a
    .jsonl source has `messages` or `prompt` and `completion`, and no `text_column`).
    """
    kind, vocab = parse_spec(tokenizer)
    if not 0 < val_fraction < 1:
        raise NanogemmaError(f"--val-fraction must be between 0 and 1 (got {val_fraction})")
    if format not in FORMATS:
        raise NanogemmaError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    if context < 2:
        raise NanogemmaError(f"--context must be at least 2 tokens, got {context}")
    folder = Path(out) if out is not None else default_out(source, tokenizer)
    workers = max(1, workers or default_workers())
    src = open_source(source, text_column=text_column, delimiter=delimiter, split=split, val_split=val_split,
                      hf_config=hf_config, seed=seed, val_fraction=val_fraction, glob=glob)
    try:
        chat = format == "chat" or (format == "auto" and _is_chat(src, text_column))
        if chat and (kind != "gemma" or not isinstance(src, LocalSource)
                     or any(f.kind != "jsonl" for f in src.files)):
            raise NanogemmaError("chat data is .jsonl files rendered with Gemma's chat template: give "
                                 "--source FILE.jsonl and --tokenizer gemma")
        recipe = {"format": FORMAT_VERSION, "source": src.recipe(), "tokenizer": tokenizer}
        if src.may_hold_out:
            recipe |= {"val_fraction": val_fraction, "seed": seed}
        if chat:
            recipe |= {"data": "chat", "context": context}
        with OutputLock(folder, "prepare"):  # two runs into one folder would mix their files
            staging = store.begin(folder, recipe, overwrite)
            if staging is None:
                return PrepareResult(folder, store.read_meta(folder), skipped=True)
            src.open()
            for note in src.warnings():
                warn(note)
            if chat:
                return _run_chat(src, folder, staging, recipe, val_fraction, seed, context, progress, warn)
            return _run(src, folder, staging, recipe, kind, vocab, tokenizer, tokenizer_file, val_fraction, seed,
                        workers, progress, warn)
    finally:
        src.close()


def _run(src: Source, folder: Path, staging: Path, recipe: dict, kind: str, vocab: int | None, spec: str,
         tokenizer_file, val_fraction: float, seed: int, workers: int, progress: bool,
         warn: Callable[[str], None]) -> PrepareResult:
    tok: DataTokenizer | None = None
    if kind == "gpt2":
        tok = load_gpt2(tokenizer_file)
    elif kind == "gemma":
        tok = load_gemma()
    key = hashlib.sha256(f"nanogemma-holdout/{seed}".encode()).digest()[:32]
    threshold = int(val_fraction * 2**64)
    target = TRAIN if src.has_val else HOLDOUT
    held_note = None
    if target == HOLDOUT and isinstance(src, LocalSource) and src.total_bytes() <= SMALL_CORPUS:
        threshold, held_note = _hold_out_at_least_one(src, key, threshold, val_fraction)
        if held_note:
            warn(held_note)

    # Workers are told where the tokenizer files will be; a BPE is trained (below) before they need it.
    names = tok.save(staging) if tok is not None else [BPE_FILE]
    _worker.clear()
    _worker["ref"] = (spec, str(staging), tuple(names))
    if tok is not None:
        _worker["tok"] = tok  # forked workers inherit it
    # Fork before any thread pool runs in this process (the BPE trainer's): forked workers then start
    # instantly, sharing the loaded tokenizer.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    pool = mp.get_context(method).Pool(workers, _init_worker, (_worker["ref"],)) if workers > 1 else None
    writers = {s: store.TokenWriter(staging / f) for s, f in store.SPLIT_FILES.items()}
    try:
        if tok is None:  # bpe:N, trained in the main process while the workers wait
            def texts() -> Iterator[str]:
                for chunk in src.chunks("train"):
                    for t in chunk.read().texts:
                        if target == TRAIN or not held_out(t, key, threshold):
                            yield t

            tok = train_bpe(texts(), vocab)
            if tok.vocab_size < vocab:
                warn(f"bpe:{vocab} produced {tok.vocab_size:,} ids: its training text has no more distinct pairs "
                     f"to merge (a small corpus runs out of them); the token files use {tok.vocab_size:,} ids")
            tok.save(staging)
            _worker["tok"] = tok
        start = time.perf_counter()
        stats = {"bad": {}, "empty": 0, "origin_docs": {}}
        passes = [("train", TRAIN), ("val", VAL)] if src.has_val else [("train", HOLDOUT)]
        for split, tgt in passes:
            tasks = ((c, tgt, key, threshold) for c in src.chunks(split))
            _write_pass(_ordered(pool, tasks, 2 * workers + 2), writers, stats, split, progress,
                        src.split_bytes(split) if isinstance(src, LocalSource) else None)
        seconds = time.perf_counter() - start
    finally:
        for w in writers.values():
            w.close()
        if pool is not None:
            pool.terminate()
            pool.join()
        _worker.clear()  # the tokenizer is not needed here any more (`tok` keeps it for the meta below)

    _report(src, writers, stats, target, val_fraction, warn)
    total = sum(w.tokens for w in writers.values())
    meta = _meta(src, tok, names, writers, stats, recipe, target, val_fraction, staging)
    if held_note:
        meta["validation"] = held_note.split(": ", 1)[1]
    store.finish(folder, staging, meta, [*names, *store.SPLIT_FILES.values()])
    return PrepareResult(folder, meta, skipped=False, seconds=seconds, tokens_per_second=total / max(seconds, 1e-9))


SMALL_CORPUS = 1 << 26  # bytes: a corpus this small is read once more to make sure validation is not empty


def _hold_out_at_least_one(src: LocalSource, key: bytes, threshold: int, val_fraction: float
                           ) -> tuple[int, str | None]:
    """A small corpus may have no document whose hash falls under the threshold: then the threshold is raised
    just past the lowest hash, so the document(s) with that hash form validation (still a rule of the text
    and the seed alone). Returns the threshold and what was done, or (threshold, None) when nothing was."""
    hashes = []
    for chunk in src.chunks("train"):
        for t in chunk.read().texts:
            hashes.append(int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8, key=key).digest(),
                                         "little"))
    if len(hashes) < 2 or min(hashes) < threshold:
        return threshold, None
    low = min(hashes)
    return low + 1, (f"--val-fraction {val_fraction:g} of {len(hashes):,} documents holds out none: holding out "
                     f"{hashes.count(low)} document(s) for validation instead (raise --val-fraction for more)")


def _write_pass(results: Iterator[Encoded], writers: dict, stats: dict, split: str, progress: bool,
                total: int | None = None) -> None:
    """Write the results; the bar counts input bytes against `total` (with an ETA) where the size is known,
    else tokens."""
    from tqdm import tqdm

    by_bytes = total is not None
    with tqdm(desc=f"tokenizing {split}", unit="B" if by_bytes else "tok", unit_scale=True, total=total,
              disable=not progress, smoothing=0.05, file=sys.stderr) as bar:
        for r in results:
            writers["train"].write(r.train, r.train_docs)
            writers["val"].write(r.val, r.val_docs)
            if r.bad_bytes:
                stats["bad"][r.origin] = stats["bad"].get(r.origin, 0) + r.bad_bytes
            stats["empty"] += r.empty
            stats["origin_docs"][r.origin] = stats["origin_docs"].get(r.origin, 0) + r.train_docs + r.val_docs
            bar.update(r.size if by_bytes else len(r.train) + len(r.val))
            bar.set_postfix(docs=f"{writers['train'].documents + writers['val'].documents:,}", refresh=False)


def _report(src: Source, writers: dict, stats: dict, target: str, val_fraction: float,
            warn: Callable[[str], None]) -> None:
    """Warnings for damaged or empty inputs, and errors when a split came out empty."""
    if stats["bad"]:
        where = ", ".join(f"{Path(o).name}: {n}" for o, n in list(stats["bad"].items())[:5])
        warn(f"replaced {sum(stats['bad'].values()):,} invalid UTF-8 byte(s) with U+FFFD ({where})")
    if stats["empty"]:
        warn(f"skipped {stats['empty']:,} empty document(s)")
    if isinstance(src, LocalSource):
        for f in src.files:
            if not stats["origin_docs"].get(str(f.path)):
                warn(f"{f.path} holds no documents")
    if writers["train"].documents == 0:
        raise NanogemmaError("the source holds no documents for training: check the files, --delimiter "
                             "and --text-column")
    if writers["val"].documents == 0:
        if target == HOLDOUT:
            raise NanogemmaError(f"no document fell into the held-out validation split ({val_fraction:g} of "
                                 f"{writers['train'].documents:,}); raise --val-fraction or give more data")
        raise NanogemmaError("the source's validation split holds no documents")


def _meta(src: Source, tok: DataTokenizer, names: list[str], writers: dict, stats: dict, recipe: dict,
          target: str, val_fraction: float, staging: Path) -> dict:
    from .. import __version__

    splits = {s: {"file": w.path.name, "tokens": w.tokens, "documents": w.documents} for s, w in writers.items()}
    meta = {
        "format": "nanogemma-tokens", "version": FORMAT_VERSION,
        "tokenizer": {**tok.describe(), "files": names},
        "dtype": tok.dtype.name,
        "source": src.describe(),
        "splits": splits,
        "validation": ("the source's validation split" if target != HOLDOUT else
                       f"held out: the training documents whose keyed BLAKE2b hash is in the lowest "
                       f"{val_fraction:g} of its range"),
        "bad_utf8_bytes": sum(stats["bad"].values()),
        "empty_documents_skipped": stats["empty"],
        "checksums": {w.path.name: w.sha.hexdigest() for w in writers.values()}
                     | {n: store.sha256_file(staging / n) for n in names},
        "recipe": recipe,
        "nanogemma_version": __version__,
    }
    if isinstance(src, SyntheticSource):
        from .synthetic import entropy_report

        meta["synthetic"] = entropy_report(lambda t: len(tok.encode(t)), tok.framing_tokens)
    return meta


# ---- chat data --------------------------------------------------------------------------------------

def _is_chat(src: Source, text_column: str) -> bool:
    """Auto-detection: the first non-blank line of the first .jsonl file is a conversation."""
    from .conversations import looks_like_chat

    if not isinstance(src, LocalSource) or not src.files or src.files[0].kind != "jsonl":
        return False
    for data, _ in split_file(src.files[0].path, b"\n"):
        for line in data.split(b"\n"):
            if line.strip():
                return looks_like_chat(line, text_column)
    return False


def _run_chat(src: LocalSource, folder: Path, staging: Path, recipe: dict, val_fraction: float, seed: int,
              context: int, progress: bool, warn: Callable[[str], None]) -> PrepareResult:
    from tqdm import tqdm

    from .conversations import Renderer, read_records

    tok = load_gemma()
    renderer = Renderer(tok)
    names = tok.save(staging)
    key = hashlib.sha256(f"nanogemma-holdout/{seed}".encode()).digest()[:32]
    threshold = int(val_fraction * 2**64)
    writers = {s: store.TokenWriter(staging / f) for s, f in store.SPLIT_FILES.items()}
    masks = {s: store.TokenWriter(staging / f) for s, f in store.MASK_FILES.items()}
    bad: list[dict] = []
    stats = {"records": 0, "bad": 0, "longest": 0, "loss_tokens": {"train": 0, "val": 0}}
    start = time.perf_counter()

    def flush(batch: list) -> None:
        for (origin, line, split, _), r in zip(batch, renderer.render_many([b[3] for b in batch]), strict=True):
            if len(r.ids) > context:
                stats["bad"] += 1
                if len(bad) < MAX_LISTED:
                    bad.append({"file": origin, "line": line,
                                "reason": f"{len(r.ids):,} tokens, longer than the context of {context:,} "
                                          "(raise --context)"})
                continue
            writers[split].write(r.ids.astype(tok.dtype), 1)
            masks[split].write(r.mask, 0)
            stats["loss_tokens"][split] += int(r.mask.sum())
            stats["longest"] = max(stats["longest"], len(r.ids))
        batch.clear()

    try:
        with tqdm(desc="rendering conversations", unit="rec", disable=not progress, file=sys.stderr) as bar:
            for f in src.files:
                batch: list = []
                for data, lines in split_file(f.path, b"\n"):
                    for rec in read_records(data, lines + 1):
                        stats["records"] += 1
                        bar.update(1)
                        if rec.error is not None:
                            stats["bad"] += 1
                            if len(bad) < MAX_LISTED:
                                bad.append({"file": str(f.path), "line": rec.line, "reason": rec.error})
                            continue
                        split = f.split if src.has_val else (
                            "val" if held_out(rec.raw.decode("utf-8", "replace"), key, threshold) else "train")
                        batch.append((str(f.path), rec.line, split, rec.messages))
                        if len(batch) >= 1024:
                            flush(batch)
                flush(batch)
    finally:
        for w in [*writers.values(), *masks.values()]:
            w.close()
    seconds = time.perf_counter() - start
    if stats["bad"]:
        where = "; ".join(f"{Path(b['file']).name} line {b['line']}: {b['reason']}" for b in bad[:5])
        more = f" (and {stats['bad'] - 5:,} more)" if stats["bad"] > 5 else ""
        warn(f"skipped {stats['bad']:,} bad record(s) of {stats['records']:,}: {where}{more}; all are listed "
             f"in {folder / store.META}")
    if writers["train"].documents == 0:
        raise NanogemmaError("no valid conversation for training: see the bad records above")
    if writers["val"].documents == 0:
        if not src.has_val:
            raise NanogemmaError(f"no conversation fell into the held-out validation split ({val_fraction:g} of "
                                 f"{writers['train'].documents:,}); raise --val-fraction or give more data")
        raise NanogemmaError("the validation file(s) hold no valid conversation")
    from .. import __version__

    splits = {s: {"file": w.path.name, "tokens": w.tokens, "documents": w.documents,
                  "mask": masks[s].path.name, "loss_tokens": stats["loss_tokens"][s]} for s, w in writers.items()}
    meta = {
        "format": "nanogemma-tokens", "version": FORMAT_VERSION,
        "tokenizer": {**tok.describe(), "files": names, "document": "<bos> conversation (Gemma 3 chat template)"},
        "dtype": tok.dtype.name,
        "source": src.describe(),
        "splits": splits,
        "validation": ("the source's validation file(s)" if src.has_val else
                       f"held out: the records whose keyed BLAKE2b hash is in the lowest {val_fraction:g} of its range"),
        "chat": {"template": "gemma3", "records": stats["records"], "conversations":
                 writers["train"].documents + writers["val"].documents, "bad_records": stats["bad"],
                 "bad_listed": bad, "longest": stats["longest"], "context": context,
                 "mask": "uint8 per token, 1 = a target of the loss (the model's replies and their <end_of_turn>)"},
        "checksums": {w.path.name: w.sha.hexdigest() for w in [*writers.values(), *masks.values()]}
                     | {n: store.sha256_file(staging / n) for n in names},
        "recipe": recipe,
        "nanogemma_version": __version__,
    }
    store.finish(folder, staging, meta, [*names, *store.SPLIT_FILES.values(), *store.MASK_FILES.values()])
    total = sum(w.tokens for w in writers.values())
    return PrepareResult(folder, meta, skipped=False, seconds=seconds, tokens_per_second=total / max(seconds, 1e-9))
