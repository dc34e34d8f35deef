"""nanogemma.files: checked reads, atomic writes, output locks, cache manifests and OS errors, one by one."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from nanogemma import files
from nanogemma.errors import NanogemmaError
from nanogemma.files import OutputLock, atomic_path, clean_orphans, manifest_ok, read_json, write_manifest


def test_read_json_names_each_kind_of_damage(tmp_path):
    f = tmp_path / "config.json"
    cases = {b'{"a": 1, "b": [1, 2': "cut short", b'{"a": 1,, }': "not valid JSON", b"\xff\xfe{}": "not UTF-8",
             b"[1, 2]": "holds list, not an object", b"": "cut short"}
    for data, needle in cases.items():
        f.write_bytes(data)
        with pytest.raises(NanogemmaError, match="restore it") as e:
            read_json(f, "model config", "restore it")
        assert needle in str(e.value) and str(f) in str(e.value), str(e.value)
    f.write_text('{"ok": true}')
    assert read_json(f) == {"ok": True}
    with pytest.raises(NanogemmaError, match="not found"):
        read_json(tmp_path / "absent.json")


def test_a_folder_or_device_is_not_a_regular_file(tmp_path):
    for path in (tmp_path, "/dev/null"):
        with pytest.raises(NanogemmaError, match="is not a regular file"):
            files.read_text(path, "prompt file")
    with pytest.raises(NanogemmaError, match="prompt file not found"):
        files.read_text(tmp_path / "nope.txt", "prompt file")


def test_text_and_escapes():
    with pytest.raises(NanogemmaError, match=r"not UTF-8 text \(byte 0xff at offset 2\)"):
        files.decode_utf8(b"ab\xffcd", "stdin")
    with pytest.raises(NanogemmaError, match="not UTF-8"):
        files.check_text("a\udcffb", "--stop")
    assert files.unescape(r"a\nb\x41\u00e9", "--stop") == "a\nbAé"
    for bad in (r"\x", r"\u12", "ab\\"):
        with pytest.raises(NanogemmaError, match="bad escape"):
            files.unescape(bad, "--delimiter")


def test_atomic_path_leaves_nothing_when_the_write_fails(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]
    files.atomic_write(target, "new")
    assert target.read_text() == "new" and len(list(tmp_path.iterdir())) == 1
    folder = tmp_path / "dir"
    for text in ("one", "two"):  # a folder replaced whole
        with atomic_path(folder, folder=True) as tmp:
            (tmp / "f").write_text(text)
    assert (folder / "f").read_text() == "two" and len(list(tmp_path.iterdir())) == 2


def test_orphans_of_dead_writers_are_cleaned_and_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    orphan = tmp_path / f".model.safetensors.tmp-{dead_pid}-0123abcd"
    orphan.write_bytes(b"x")
    orphan_dir = tmp_path / f".tok.tmp-{dead_pid}-89abcdef"
    orphan_dir.mkdir()
    mine = files.temp_name(tmp_path / "model.safetensors")
    mine.write_bytes(b"y")
    other = tmp_path / "keep.tmp-1-00000000"  # not hidden: not ours
    other.write_bytes(b"z")
    assert clean_orphans(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, other.name])


def test_output_lock_refuses_a_live_owner_and_takes_over_a_stale_one(tmp_path):
    folder = tmp_path / "out"
    with OutputLock(folder, "prepare"):
        lock = json.loads((folder / files.LOCK_FILE).read_text())
        assert lock["pid"] == os.getpid() and lock["command"] == "prepare"
        with pytest.raises(NanogemmaError, match=rf"in use by process {os.getpid()} \(nanogemma prepare\)"):
            OutputLock(folder, "train").acquire()
    assert not (folder / files.LOCK_FILE).exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (folder / files.LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid, "command": "train"}))
        with pytest.raises(NanogemmaError, match=f"in use by process {sleeper.pid}"):
            OutputLock(folder, "train").acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with OutputLock(folder, "train"):  # its owner is gone: stale, taken over
        assert json.loads((folder / files.LOCK_FILE).read_text())["pid"] == os.getpid()
    (folder / files.LOCK_FILE).write_text('{"pid": ')  # cut short while written: stale too
    with OutputLock(folder, "train"):
        pass
    # our own pid in a lock this process does not hold (a previous run in this process that crashed): stale
    (folder / files.LOCK_FILE).write_text(json.dumps({"pid": os.getpid(), "command": "train"}))
    with OutputLock(folder, "train"):
        pass


def test_manifest_catches_changed_bytes_and_trusts_unchanged_files_by_stat(tmp_path, monkeypatch):
    f = tmp_path / "weights.bin"
    f.write_bytes(os.urandom(1 << 16))
    manifest = tmp_path / "m.json"
    write_manifest(manifest, [f])
    calls = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda p: calls.append(p) or real(p))
    assert manifest_ok(manifest, [f]) and manifest_ok(manifest) and calls == []  # unchanged: a stat, no hash
    data = bytearray(f.read_bytes())
    data[1000:1008] = b"\0" * 8  # a zeroed run of bytes, same size
    f.write_bytes(bytes(data))
    assert not manifest_ok(manifest, [f]) and calls
    write_manifest(manifest, [f])
    os.utime(f, ns=(1, 1))  # touched, same bytes: hashed once, then trusted by stat again
    calls.clear()
    assert manifest_ok(manifest, [f]) and len(calls) == 1
    assert manifest_ok(manifest, [f]) and len(calls) == 1
    f.write_bytes(b"short")
    assert not manifest_ok(manifest, [f])
    assert not manifest_ok(tmp_path / "absent.json", [f])


def test_os_errors_read_as_one_line_with_what_to_do():
    e = OSError(errno.ENOSPC, "No space left on device", "/data/train.bin")
    assert files.describe_os_error(e) == ("/data/train.bin: No space left on device; free some disk space and run "
                                          "again (nothing incomplete was kept)")
    assert "read-only" in files.describe_os_error(OSError(errno.EROFS, "Read-only file system", "/x"))
    assert "\n" not in files.describe_os_error(OSError("weird"))
