"""`nanogemma prepare` from the command line: output, one-line errors, and a run killed midway that a
re-run completes, giving exactly the files of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from nanogemma.cli import main
from nanogemma.data import prepare, read_meta
from nanogemma.data.synthetic import stories

ROOT = Path(__file__).resolve().parents[1]


def test_cli_prepares_then_has_nothing_to_do(tmp_path, capsys, monkeypatch, gpt2_tiktoken_file):
    monkeypatch.setenv("NANOGEMMA_GPT2_TIKTOKEN", str(gpt2_tiktoken_file))
    args = ["prepare", "--source", "synthetic:300", "--out", str(tmp_path / "o"), "--workers", "1"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "train" in out and "gpt2, 50,257 ids as uint16" in out and "nats/token" in out
    assert main(args) == 0
    assert "already prepared with these arguments: nothing to do" in capsys.readouterr().out


def test_cli_delimiter_escapes(tmp_path, capsys, monkeypatch, gpt2_tiktoken_file):
    monkeypatch.setenv("NANOGEMMA_GPT2_TIKTOKEN", str(gpt2_tiktoken_file))
    (tmp_path / "a.txt").write_text("one\nstill one\n\ntwo\n\nthree\n")
    assert main(["prepare", "--source", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o"), "--workers", "1",
                 "--delimiter", r"\n\n", "--val-fraction", "0.5"]) == 0
    m = read_meta(tmp_path / "o")
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == 3


def test_cli_errors_are_one_line(tmp_path, capsys):
    for args, message in [
        (["--source", str(tmp_path / "missing.txt")], "source not found"),
        (["--source", "synthetic:10", "--tokenizer", "word2vec"], "unknown tokenizer 'word2vec'"),
        (["--source", "synthetic:10", "--val-fraction", "1.5"], "--val-fraction: must be at most 1"),
    ]:
        try:
            rc = main(["prepare", "--out", str(tmp_path / "o"), *args])
        except SystemExit as e:  # a flag's value is refused by the parser: exit status 2, one line too
            rc = e.code
        assert rc in (1, 2)
        err = capsys.readouterr().err
        assert err.startswith("nanogemma") and ": error: " in err and message in err and err.count("\n") == 1, err


def test_killed_midway_then_rerun_completes(tmp_path, gpt2_tiktoken_file):
    base = list(stories(1000, seed=4))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"{i}. {base[i % 1000]}\n" for i in range(40_000)))  # ~13 MB
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "nanogemma", "prepare", "--source", str(corpus), "--out", str(out),
           "--workers", "2", "--no-progress"]
    env = {**os.environ, "NANOGEMMA_GPT2_TIKTOKEN": str(gpt2_tiktoken_file), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    partial = out / ".partial" / "train.bin"
    deadline = time.monotonic() + 60
    try:
        while not (partial.exists() and partial.stat().st_size > 0):
            assert proc.poll() is None, f"finished before it could be killed: {proc.communicate()}"
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the main process and its workers, mid-write
        proc.wait()
    written = partial.stat().st_size
    assert not (out / "meta.json").exists() and not (out / "train.bin").exists()  # nothing looks finished

    rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    reference = prepare(str(corpus), tmp_path / "reference", tokenizer_file=gpt2_tiktoken_file, workers=2)
    assert read_meta(out) == reference.meta
    for name in ("train.bin", "val.bin", "gpt2.tiktoken"):
        assert (out / name).read_bytes() == (tmp_path / "reference" / name).read_bytes()
    assert 0 < written < (out / "train.bin").stat().st_size and not (out / ".partial").exists()


def test_cli_summary_names_the_rule_and_the_files_per_split(tmp_path, capsys, monkeypatch, gpt2_tiktoken_file):
    monkeypatch.setenv("NANOGEMMA_GPT2_TIKTOKEN", str(gpt2_tiktoken_file))
    src = tmp_path / "src"
    for rel in ("train/a.txt", "train/b.txt", "validation/c.txt"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_text(f"{rel}: a paragraph.\n\nAnd another.\n")
    assert main(["prepare", "--source", str(src), "--out", str(tmp_path / "o"), "--workers", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "files: 2 train, 1 val (splits by folder and file names; --val-split none to hold out instead)" in out
    assert "text: one document per file (3 files) (--delimiter to choose)" in out
    assert "validation: the source's validation split" in out
