"""`nanogemma generate` as a user runs it: a subprocess, the real 270M model, and every kind of bad input.

Bad input must give one line on stderr that says what is wrong, a non-zero exit, and no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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


def test_corrupt_and_truncated_gguf(tmp_path, gguf_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    assert_clean_error(run("generate", "hi", "--model", str(bad)), "not a readable GGUF")
    with open(gguf_path, "rb") as f:
        head = f.read(8 << 20)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(head)
    assert_clean_error(run("generate", "hi", "--model", str(cut)), "cut.gguf")


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
