"""`nanogemma generate` as a user runs it: a subprocess, the real 270M model, and every kind of bad input.

Bad input must give one line on stderr that says what is wrong, a non-zero exit, and no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import tiny_model, write_gguf

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run(*args: str, stdin: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nanogemma", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("nanogemma: error:"), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_generate_streams_the_api_result(model_and_tok):
    import nanogemma

    model, tok = model_and_tok
    expected = nanogemma.generate(model, tok, "Once upon a time", max_new_tokens=12)
    proc = run("generate", "Once upon a time", "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.rstrip("\n") == expected
    # The prompt may also come from standard input or a file.
    assert run("generate", "--max-new-tokens", "12", stdin="Once upon a time").stdout == proc.stdout


def test_generate_prompt_file_and_sampling_flags(tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("The weather today is", encoding="utf-8")
    args = ("generate", "--prompt-file", str(prompt), "--max-new-tokens", "8", "--temperature", "0.8",
            "--top-k", "40", "--top-p", "0.9", "--seed", "7")
    a, b = run(*args), run(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()  # a seed reproduces


def test_help_documents_every_flag():
    out = run("generate", "--help").stdout
    for flag in ("--model", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--seed", "--dtype",
                 "--device", "--prompt-file"):
        assert flag in out, flag
    assert run("--help").returncode == 0


def test_missing_model_file(tmp_path):
    assert_clean_error(run("generate", "hi", "--model", str(tmp_path / "missing.gguf")), "not found")


def test_corrupt_and_truncated_gguf(tmp_path):
    """Random bytes after the magic, and a download cut off in the tensor data (a tiny model's GGUF: the
    official one's 262,144-entry vocabulary takes the gguf package 20 s to parse before the cut is found)."""
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    assert_clean_error(run("generate", "hi", "--model", str(bad)), "not a readable GGUF")
    model = tiny_model()
    whole = write_gguf(tmp_path / "whole.gguf", model.config, model.state_dict()).read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    assert_clean_error(run("generate", "hi", "--model", str(cut)), "cut.gguf", "not a readable GGUF")


def test_gguf_of_another_architecture(tmp_path):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_clean_error(run("generate", "hi", "--model", str(tmp_path / "llama.gguf")), "llama", "Gemma 3")


def test_hf_folder_missing_a_shard(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    from nanogemma.config import get_preset, to_hf_config

    (folder / "config.json").write_text(json.dumps(to_hf_config(get_preset("tiny"))))
    index = {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                            "model.norm.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_clean_error(run("generate", "hi", "--model", str(folder)), "model-00001-of-00002.safetensors")


def test_prompt_longer_than_the_context(tmp_path):
    long = tmp_path / "long.txt"
    long.write_text("word " * 33_000, encoding="utf-8")
    assert_clean_error(run("generate", "--prompt-file", str(long)), "context is 32768")


@pytest.mark.parametrize("args, needle", [
    (("--temperature", "-1"), "--temperature"),
    (("--top-p", "1.5"), "--top-p"),
    (("--prompt-file", "/nonexistent/prompt.txt"), "prompt file not found"),
])
def test_bad_flags(args, needle):
    assert_clean_error(run("generate", *args) if "--prompt-file" in args else run("generate", "hi", *args),
                       needle)


# ----------------------------------------------------------------- in-process: the first-day conveniences


def test_bare_command_version_and_bench_modes(capsys):
    from nanogemma import __version__, cli

    assert cli.main([]) == 0
    assert "COMMAND" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"nanogemma {__version__}"
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for mode in ("float32", "float32-unpacked", "bfloat16", "int8", "int8-wo", "+compile", "+spec"):
        assert mode in text, mode


@pytest.mark.usefixtures("one_thread")
def test_generate_prompts_stdin_stats_and_compile_message(capsys, monkeypatch):
    import io

    from helpers import tiny_model

    from nanogemma import cli, generation
    from nanogemma.cli import generate as generate_cli
    from nanogemma.tokenizer import load_tokenizer

    tok = load_tokenizer()
    loaded = (tiny_model(vocab_size=262_144), tok)  # a tiny model over the real vocabulary, loaded once
    monkeypatch.setattr(generate_cli, "_load_for_inference", lambda _args: loaded)  # the rest is the CLI's

    def gen(*args, stdin=None):
        if stdin is not None:
            monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        assert cli.main(["generate", *args]) == 0, capsys.readouterr().err
        return capsys.readouterr()

    alone = gen("Hello", "--max-new-tokens", "3").out
    assert gen("--max-new-tokens", "3", stdin="Hello\n").out == alone  # echo's newline is not part of the prompt
    assert gen("--max-new-tokens", "3", stdin="Hello\n\n").out != alone  # only one is dropped
    # Prompts anywhere among the flags.
    rows = [json.loads(line) for line in gen("A", "--max-new-tokens", "2", "B", "--jsonl").out.splitlines()]
    assert [r["prompt"] for r in rows] == ["A", "B"]
    with pytest.raises(SystemExit):
        cli.main(["generate", "A", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
    # --stats: the timing summary on stderr, stdout unchanged.
    got = gen("Hello", "--max-new-tokens", "3", "--stats")
    assert got.out == alone
    n_prompt = len(tok.encode("Hello"))
    assert f"1 prompt(s), {n_prompt} prompt tokens in" in got.err and "generated tokens in" in got.err
    assert "tokens/s" in got.err
    # --compile says what the wait is (the compiler itself is swapped for the eager step here).
    monkeypatch.setattr(generation.Session, "_compile", lambda self, how: self._eager_step)
    got = gen("Hello", "--max-new-tokens", "3", "--compile")
    assert got.out == alone and "compiling the decode step" in got.err


@pytest.mark.usefixtures("one_thread")
def test_library_generate_says_what_it_takes():
    from helpers import tiny_model

    import nanogemma
    from nanogemma.errors import NanogemmaError
    from nanogemma.tokenizer import load_tokenizer

    model, tok = tiny_model(vocab_size=262_144), load_tokenizer()
    for bad in (42, ["Hi", "Hello there"]):  # a list is generate_batch's, and the error says so
        with pytest.raises(NanogemmaError, match="generate takes one prompt .* use generate_batch"):
            nanogemma.generate(model, tok, bad, max_new_tokens=3)
