"""The command line fed a generated set of bad flag values and bad files (issue 18, items 8-13).

For every case: a non-zero exit, at most 3 lines on stderr, no traceback, nothing on stdout (no output
that looks complete). The cases run in process (`nanogemma.cli.main`), on the session's tiny run and
copies of it damaged in each way; only standard input needs a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nanogemma.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]

BAD_NUMBERS = ["nan", "inf", "-inf", "-1", "abc", "1e400", "1180591620717411303424"]  # the last: 2**70
NUMERIC_FLAGS = {
    "generate": ["--temperature", "--top-p", "--top-k", "--min-p", "--repetition-penalty", "--seed",
                 "--max-new-tokens", "--batch-size", "--draft-tokens", "--draft-vocab"],
    "chat": ["--temperature", "--context", "--max-new-tokens", "--seed", "--top-p"],
    "eval": ["--seq-len", "--batch-size", "--max-tokens", "--samples", "--num-prompts", "--judge-timeout",
             "--judge-deadline", "--temperature", "--top-p", "--seed"],
    "prepare": ["--val-fraction", "--seed", "--workers"],
    "serve": ["--port", "--slots", "--timeout", "--step-tokens", "--context"],
    "bench": ["--prompt-tokens", "--new-tokens", "--peak-bandwidth", "--threads"],
    "inspect": ["--context"],
    "verify": ["--tokens", "--tolerance"],
}
TRAIN_FLAGS = ["--lr", "--min-lr", "--eps", "--grad-clip", "--sample-temperature", "--seed", "--max-steps",
               "--batch-size", "--init-std", "--weight-decay", "--beta1", "--decay-steps", "--warmup-steps"]
TRAIN_BAD = ["nan", "inf", "-1", "abc", "1e400"]
BAD_DEVICES = ["tpu", "meta", "cuda:99", "gpu0", ""]


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    out = change(data)
    path.write_text(json.dumps(data if out is None else out))


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture(scope="module")
def bad(tiny_run, tiny_data, tmp_path_factory) -> dict[str, Path]:
    """Damaged copies of the tiny run, of a Hugging Face export of it, of its data, and odd paths."""
    from safetensors.torch import load_file, save_file

    from nanogemma.tools.export import export_hf
    from nanogemma.tools.export_gguf import export_gguf

    root = tmp_path_factory.mktemp("bad")
    hf = export_hf(tiny_run, root / "hf-good")
    gguf = export_gguf(tiny_run, root / "good.gguf", "f32")
    made: dict[str, Path] = {}

    def run_variant(name: str, edit) -> None:
        folder = root / f"run-{name}"
        shutil.copytree(tiny_run, folder, ignore=shutil.ignore_patterns("last", "best", "tensorboard"))
        edit(folder)
        made[f"run-{name}"] = folder

    def hf_variant(name: str, edit) -> None:
        folder = root / f"hf-{name}"
        shutil.copytree(hf, folder)
        edit(folder)
        made[f"hf-{name}"] = folder

    meta = "nanogemma.json"
    run_variant("meta-truncated", lambda f: _truncate(f / meta))
    run_variant("meta-garbage", lambda f: (f / meta).write_bytes(b"\x00\xffnot json"))
    run_variant("meta-list", lambda f: (f / meta).write_text("[1, 2, 3]"))
    run_variant("meta-no-model", lambda f: _edit_json(f / meta, lambda d: d.pop("model")))
    run_variant("model-list", lambda f: _edit_json(f / meta, lambda d: d.update(model=[64, 4])))
    for key, value in [("num_heads", 0), ("hidden_size", "64"), ("query_pre_attn_scalar", 0), ("sliding_window", 0),
                       ("norm_eps", -1.0), ("num_layers", 0), ("head_dim", 3), ("vocab_size", None)]:
        run_variant(f"{key}-{value}", lambda f, k=key, v=value: _edit_json(f / meta, lambda d: d["model"].update({k: v})))
    run_variant("weights-truncated", lambda f: _truncate(f / "model.safetensors"))
    run_variant("weights-garbage", lambda f: (f / "model.safetensors").write_bytes(os.urandom(4096)))

    def int_weights(f: Path) -> None:
        state = load_file(str(f / "model.safetensors"))
        (f / "model.safetensors").unlink()  # a hard link into the checkpoint: replace it, not write through it
        save_file({k: (v * 100).to(torch.int32) for k, v in state.items()}, str(f / "model.safetensors"))

    run_variant("weights-int", int_weights)
    run_variant("tokenizer-truncated", lambda f: _truncate(f / "tokenizer.json"))
    run_variant("tokenizer-config-garbage", lambda f: (f / "tokenizer_config.json").write_text("{oops"))

    cfg = "config.json"
    hf_variant("config-list", lambda f: (f / cfg).write_text("[]"))
    hf_variant("config-truncated", lambda f: _truncate(f / cfg))
    for key, value in [("num_attention_heads", 0), ("hidden_size", "64"), ("rms_norm_eps", -1e-6),
                       ("sliding_window", 0), ("query_pre_attn_scalar", 0), ("layer_types", 7),
                       ("rope_scaling", [1])]:
        hf_variant(f"{key}-{value}", lambda f, k=key, v=value: _edit_json(f / cfg, lambda d: d.update({k: v})))

    def sharded(index_text: str):
        def edit(f: Path) -> None:
            (f / "model.safetensors").rename(f / "model-00001-of-00001.safetensors")
            (f / "model.safetensors.index.json").write_text(index_text)
        return edit

    hf_variant("index-truncated", sharded('{"weight_map": {"model.embed_tokens.weight": "model-0'))
    hf_variant("index-no-map", sharded('{"metadata": {}}'))
    hf_variant("index-list", sharded("[]"))

    gguf_bad = root / "truncated.gguf"
    gguf_bad.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 3])
    made["gguf-truncated"] = gguf_bad
    made["empty-dir"] = root / "empty"
    made["empty-dir"].mkdir()
    made["text-file"] = root / "notes.txt"
    made["text-file"].write_text("hello")

    def data_variant(name: str, edit) -> None:
        folder = root / f"data-{name}"
        shutil.copytree(tiny_data, folder)
        edit(folder)
        made[f"data-{name}"] = folder

    data_variant("odd-size", lambda f: (f / "val.bin").write_bytes((f / "val.bin").read_bytes()[:-1]))
    data_variant("dtype", lambda f: _edit_json(f / "meta.json", lambda d: d.update(dtype="int64")))
    data_variant("no-splits", lambda f: _edit_json(f / "meta.json", lambda d: d.pop("splits")))
    data_variant("meta-list", lambda f: (f / "meta.json").write_text("[]"))
    data_variant("meta-truncated", lambda f: _truncate(f / "meta.json"))

    def big_id(f: Path) -> None:
        ids = np.fromfile(f / "val.bin", dtype=np.uint16)
        ids[-1] = 60000
        ids.tofile(f / "val.bin")

    data_variant("id-range", big_id)
    latin1 = root / "latin1.txt"
    latin1.write_bytes("café déjà".encode("latin-1"))
    made["latin1"] = latin1
    toml = root / "bad.toml"
    toml.write_bytes(b"lr = \xff\n")
    made["toml-bytes"] = toml
    made["toml-syntax"] = root / "syntax.toml"
    made["toml-syntax"].write_text("lr = = 1\n")
    return made


def cases(bad: dict[str, Path], run: Path, data: Path, out: Path) -> list[list[str]]:
    """Every bad invocation: flag values, devices, text, files."""
    argv: list[list[str]] = []
    kinds = _flag_kinds()
    for command, flags in NUMERIC_FLAGS.items():
        for flag in flags:
            for value in BAD_NUMBERS:
                if value == BAD_NUMBERS[-1] and kinds[command, flag] != "int":
                    continue  # 2**70 is a fine (if long) number of seconds: only whole-number flags refuse it
                model = ["--model", str(run)] if command in ("generate", "chat", "eval", "verify", "bench") else []
                argv.append([command, *model, f"{flag}={value}"])
    for flag in TRAIN_FLAGS:
        for value in TRAIN_BAD:
            argv.append(["train", "--data", str(data), "--out-dir", str(out / "t"), f"{flag}={value}"])
    argv.append(["train", "--data", str(data), "--out-dir", str(out / "t"), "--seed", str(2**70)])
    argv.append(["train", "--data", str(data), "--out-dir", str(out / "t"), "--lr", "1e-3", "--min-lr", "nan"])
    for device in BAD_DEVICES:
        for command in ("generate", "chat", "eval"):
            argv.append([command, "--model", str(run), "--device", device, *(["x"] if command == "generate" else []),
                         *(["--text", str(bad["text-file"])] if command == "eval" else [])])
        argv.append(["train", "--data", str(data), "--out-dir", str(out / "t"), "--device", device or "none"])
    gen = ["generate", "--model", str(run), "--max-new-tokens", "1"]
    argv += [
        [*gen, "x", "--stop", "\\x"], [*gen, "x", "--stop", "\\u12"], [*gen, "x", "--stop", "end\\"],
        ["prepare", "--source", "synthetic:10", "--out", str(out / "p"), "--delimiter", "\\u12"],
        [*gen, "\udcff"], [*gen, "ok", "--stop", "\udcfe"],
        [*gen, "--prompt-file", str(bad["latin1"])], [*gen, "--prompts-file", str(bad["latin1"])],
        [*gen, "--prompt-file", str(bad["empty-dir"])], [*gen, "--prompt-file", "/dev/null"],
        [*gen, "--prompt-file", str(out / "missing.txt")], [*gen, "--prompts-file", str(bad["empty-dir"])],
        ["eval", "--model", str(run), "--text", str(bad["latin1"])],
        ["eval", "--model", str(run), "--text", str(bad["empty-dir"])],
        ["eval", "--model", str(run), "--judge-url", "http://127.0.0.1:9/v1", "--judge-model", "m",
         "--prompts", str(bad["latin1"])],
        [*gen, "a", "b", "--speculate"], [*gen, "a", "b", "--lookup"],
        ["train", "--config", str(bad["toml-bytes"]), "--data", str(data)],
        ["train", "--config", str(bad["toml-syntax"]), "--data", str(data)],
        ["train", "--config", str(bad["empty-dir"]), "--data", str(data)],
        [*gen, "x", "--model", "/dev/null"], [*gen, "x", "--model", str(bad["empty-dir"])],
        [*gen, "x", "--model", str(bad["text-file"])], [*gen, "x", "--model", str(bad["gguf-truncated"])],
        ["prepare", "--source", "synthetic:10", "--out", str(bad["text-file"])],
        ["train", "--data", str(data), "--out-dir", str(bad["text-file"])],
        ["export", str(run), str(bad["text-file"] / "sub"), "--to", "hf"],
    ]
    for name, path in bad.items():
        if name.startswith(("run-", "hf-")):
            argv.append([*gen, "x", "--model", str(path)])
            if "tokenizer" not in name and name != "run-weights-int":  # inspect reads shapes, not values
                argv.append(["inspect", "--model", str(path)])
        elif name.startswith("data-"):
            argv.append(["train", "--data", str(path), "--out-dir", str(out / f"t-{name}"), "--preset", "tiny",
                         "--progress", "false", "--tensorboard", "false"])
            argv.append(["eval", "--model", str(run), "--data", str(path)])
    return argv


def _flag_kinds() -> dict[tuple[str, str], str]:
    """(command, flag) -> the name of its argparse type, read from the parser itself."""
    import argparse

    from nanogemma.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {(name, opt): getattr(action.type, "__name__", "str") for name, p in sub.choices.items()
            for action in p._actions for opt in action.option_strings}


def run_in_process(capsys, argv: list[str]) -> tuple[int, str, str]:
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_bad_flags_and_files_give_one_clear_line(bad, tiny_run, tiny_data, tmp_path, capsys, private_cache,
                                                 monkeypatch):
    import time

    from nanogemma import cli

    parser = cli.build_parser()  # one parser for every case: building it is most of a refused case's time
    monkeypatch.setattr(cli, "build_parser", lambda: parser)

    failures, slow = [], []
    all_cases = cases(bad, tiny_run, tiny_data, tmp_path)
    assert len(all_cases) > 300
    for argv in all_cases:
        t0 = time.perf_counter()
        rc, out, err = run_in_process(capsys, argv)
        if time.perf_counter() - t0 > 10:
            slow.append(argv)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        problems = [why for why, bad_ in [
            (f"exit status {rc}", rc in (0, None)),
            (f"{len(lines)} lines on stderr", len(lines) > 3 or not lines),
            ("a traceback", "Traceback" in err),
            ("output on stdout", out.strip() != ""),
            ("no error line", not any(": error: " in ln for ln in lines)),
        ] if bad_]
        if problems:
            failures.append(f"{argv}: {', '.join(problems)}\n    stderr: {err[-500:]!r}\n    stdout: {out[-200:]!r}")
    assert not failures, f"{len(failures)} of {len(all_cases)} cases:\n" + "\n".join(failures[:20])
    assert not slow, f"bad input must fail before any real work: {slow}"


def test_the_same_flags_with_good_values_still_work(tiny_run, capsys):
    """The checks refuse only what is wrong: the flags' own edge values pass."""
    rc, out, err = run_in_process(capsys, ["generate", "--model", str(tiny_run), "Once", "--max-new-tokens", "2",
                                           "--temperature", "0", "--top-p", "1", "--min-p", "0", "--seed",
                                           str(2**64 - 1), "--repetition-penalty", "1.5", "--top-k", "1e1"])
    assert rc == 0 and out.startswith("Once") is False and err == "", err


def _cli(*args: str, stdin: bytes | None = None, shell_suffix: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if shell_suffix:
        cmd = " ".join([sys.executable, "-m", "nanogemma", *(f"'{a}'" for a in args), shell_suffix])
        return subprocess.run(["bash", "-c", cmd], capture_output=True, timeout=300, env=env)
    return subprocess.run([sys.executable, "-m", "nanogemma", *args], input=stdin, capture_output=True,
                          timeout=300, env=env)


def test_standard_input_that_is_not_text(tiny_run, tiny_hf, private_cache):
    checks = [
        (_cli("generate", "--model", str(tiny_run), "--max-new-tokens", "1", stdin=b"caf\xe9\n"),
         "standard input is not UTF-8 text (byte 0xe9 at offset 3)"),
        (_cli("generate", "--model", str(tiny_run), "--max-new-tokens", "1", shell_suffix="<&-"), "no prompt"),
        (_cli("chat", "--model", str(tiny_hf), "--max-new-tokens", "1", stdin=b"\xff\xfe\n"), "not UTF-8"),
    ]
    for proc, needle in checks:
        err = proc.stderr.decode("utf-8", "replace")
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert proc.returncode != 0 and "Traceback" not in err and len(lines) <= 3, err
        assert needle in err, err
