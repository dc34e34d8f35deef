"""Benchmark `nanogemma prepare` against a plain single-process tiktoken loop, on the same corpus, same run.

    python bench/bench_prepare.py --tokenizer-file tests/data/gpt2.tiktoken        # 200 MB corpus

The corpus is synthetic stories, one per line (written once, then reused). The baseline is what a
one-off script does: read each line, `encode_ordinary` it, append the end-of-text id, write uint16 arrays
in blocks. `prepare` does the same work (plus the held-out split, checksums and meta.json) with worker
processes. Both are timed end to end, with the corpus already in the page cache, in alternating rounds;
the best round of each is reported (the usual defence against other programs on a shared machine).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from nanogemma.data import prepare
from nanogemma.data.encoders import load_gpt2
from nanogemma.data.synthetic import stories
from nanogemma.machine import describe_cpu


def _write_part(args: tuple[str, int, int]) -> None:
    path, start, count = args
    with open(path, "w", encoding="utf-8") as f:
        for text in stories(count, seed=123, start=start):
            f.write(text + "\n")


def make_corpus(path: Path, megabytes: int) -> Path:
    """Synthetic stories, one per line, about `megabytes` MB (about 316 bytes a story), in parallel."""
    if path.exists() and path.stat().st_size >= megabytes * 1e6:
        return path
    n = int(megabytes * 1e6 / 316) + 1
    parts = 16
    names = [f"{path}.part{i}" for i in range(parts)]
    step = -(-n // parts)
    with mp.Pool() as pool:
        pool.map(_write_part, [(names[i], i * step, min(step, n - i * step)) for i in range(parts)])
    with open(path, "wb") as out:
        for name in names:
            with open(name, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
            os.unlink(name)
    return path


def baseline(corpus: Path, out: Path, tokenizer_file: str | None) -> tuple[int, float]:
    """The plain loop: (tokens, seconds)."""
    start = time.perf_counter()
    enc = load_gpt2(tokenizer_file).enc
    eot = enc.eot_token
    total = 0
    with open(corpus, encoding="utf-8") as f, open(out, "wb") as w:
        buf: list[int] = []
        for line in f:
            buf.extend(enc.encode_ordinary(line.rstrip("\n")))
            buf.append(eot)
            if len(buf) >= 1 << 20:
                np.array(buf, dtype=np.uint16).tofile(w)
                total += len(buf)
                buf = []
        np.array(buf, dtype=np.uint16).tofile(w)
        total += len(buf)
    return total, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--megabytes", type=int, default=200)
    ap.add_argument("--corpus", default=str(Path(tempfile.gettempdir()) / "nanogemma-bench" / "stories.txt"))
    ap.add_argument("--tokenizer-file", default=None, help="gpt2.tiktoken, when tiktoken cannot download it")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best time of each counts")
    args = ap.parse_args()

    corpus = Path(args.corpus)
    corpus.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    make_corpus(corpus, args.megabytes)
    size = corpus.stat().st_size
    print(f"corpus: {corpus} ({size / 1e6:,.0f} MB, made or found in {time.perf_counter() - t:.0f} s)")
    with open(corpus, "rb") as f:  # into the page cache, so neither contender pays for the first read
        while f.read(1 << 24):
            pass
    load = " ".join(Path("/proc/loadavg").read_text().split()[:3]) if Path("/proc/loadavg").exists() else "n/a"
    work = Path(tempfile.mkdtemp(prefix="nanogemma-bench-"))
    workers = args.workers or os.cpu_count()
    base_times, our_times = [], []
    try:
        for round_ in range(1, args.rounds + 1):  # alternate, so that both meet the same background load
            n_base, s_base = baseline(corpus, work / "baseline.bin", args.tokenizer_file)
            t = time.perf_counter()
            r = prepare(str(corpus), work / "prepared", "gpt2", tokenizer_file=args.tokenizer_file,
                        workers=args.workers, overwrite=True, progress=False, delimiter="line")
            s_ours = time.perf_counter() - t
            n_ours = sum(s["tokens"] for s in r.meta["splits"].values())
            if n_ours != n_base:
                raise SystemExit(f"token counts differ: {n_ours} vs {n_base}")
            base_times.append(s_base)
            our_times.append(s_ours)
            print(f"round {round_}: baseline {s_base:.1f} s = {n_base / s_base:,.0f} tokens/s; prepare "
                  f"({workers} workers) {s_ours:.1f} s = {n_ours / s_ours:,.0f} tokens/s; ratio {s_base / s_ours:.2f}x",
                  flush=True)
            (work / "prepared" / "meta.json").unlink()  # so that the next round does the work again
        b, o = min(base_times), min(our_times)
        print(f"best of {args.rounds}: baseline (1 process, encode_ordinary loop) {n_base / b:,.0f} tokens/s; "
              f"nanogemma prepare ({workers} workers) {n_ours / o:,.0f} tokens/s; speed-up {b / o:.2f}x")
        print(f"{n_base:,} tokens, {size / 1e6:,.0f} MB; machine: {describe_cpu()} "
              f"({platform.machine()}), Python {platform.python_version()}, load average before: {load}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
