"""Files as a user's input and as nanogemma's output: one place that turns damage into a clear error.

Every command reads and writes through these few functions, so each kind of failure is handled once:

* **reading**: `read_text` and `read_json` name the file, say what is wrong with it (missing, not a regular
  file, not UTF-8, cut short, not JSON, the wrong kind of JSON value) and what to do, as a
  `NanogemmaError`; `regular_file` is the check they share ("not a regular file" for a folder or
  `/dev/null`, "not found" only when nothing is there);
* **writing**: `atomic_write` puts bytes under a temporary name in the same folder and renames them over
  the target, so a reader sees the old file or the new one, never half of one; the temporary name holds the
  writer's pid, so `clean_orphans` can delete what a killed writer left (and only that);
* **owning**: `OutputLock` makes an output folder one process's at a time: a lock file holding the owner's
  pid; a lock whose owner is gone (killed, crashed) is stale and taken over;
* **trusting a cache**: `write_manifest` records each file's size and SHA-256 when a cache entry is
  written; `manifest_ok` compares sizes on every use and re-hashes only when a file's (size, mtime, inode)
  differs from the last check, so a warm start pays a few `stat` calls and any later write into the
  cache (random bytes, a zeroed page, a truncation) is caught before its content is used;
* **the operating system's errors**: `describe_os_error` turns an `OSError` (disk full, read-only,
  permission, a file where a folder should be) into one line with what to do; the CLI uses it for every
  `OSError` that reaches it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import stat
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import NanogemmaError

LOCK_FILE = ".nanogemma.lock"
_TMP = re.compile(r"\.tmp-(\d+)-[0-9a-f]{8}")  # what `temp_name` writes: the owner's pid, then a random tag


# ------------------------------------------------------------------------------------------------ reading


def regular_file(path: str | Path, what: str = "file") -> Path:
    """`path` if it is a regular file (or a link to one); else a NanogemmaError that says what it is."""
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except FileNotFoundError:
        raise NanogemmaError(f"{what} not found: {path}") from None
    except OSError as e:
        raise NanogemmaError(f"{what} {path} cannot be opened ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a device or special file"
        raise NanogemmaError(f"{what} {path} is not a regular file (it is {kind}); pass a file")
    return path


def decode_utf8(data: bytes, where: str) -> str:
    """`data` as UTF-8 text, or a NanogemmaError naming the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NanogemmaError(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                             "convert it, e.g. iconv -t UTF-8") from None


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file, checked (see the module docstring)."""
    path = regular_file(path, what)
    return decode_utf8(path.read_bytes(), f"{what} {path}")


def read_json(path: str | Path, what: str = "file", fix: str = "restore or re-create it",
              kind: type | tuple[type, ...] = dict) -> Any:
    """A JSON file holding a value of `kind` (an object by default), or a NanogemmaError naming the file and
    `fix`, what to do about it."""
    path = regular_file(path, what)
    try:
        value = json.loads(decode_utf8(path.read_bytes(), str(path)))
    except NanogemmaError as e:
        raise NanogemmaError(f"{e}; {fix}") from None
    except json.JSONDecodeError as e:
        cut = e.pos >= len(e.doc.rstrip()) or e.msg.startswith("Unterminated string")
        why = "cut short" if cut else f"not valid JSON ({e.msg}: line {e.lineno}, column {e.colno})"
        raise NanogemmaError(f"{path} is damaged: {why}; {fix}") from None
    if not isinstance(value, kind):
        want = "an object" if kind is dict else "a list" if kind is list else "a JSON value of another kind"
        raise NanogemmaError(f"{path} is damaged: it holds {type(value).__name__}, not {want}; {fix}")
    return value


def check_text(value: str, where: str) -> str:
    """A command-line argument: refuse bytes that are not UTF-8 (Python keeps them as lone surrogates)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise NanogemmaError(f"{where} holds bytes that are not UTF-8 (at character {e.start}); "
                             "pass UTF-8 text") from None
    return value


def read_stdin(what: str = "standard input") -> str:
    """All of standard input as UTF-8 text (a closed stdin reads as nothing)."""
    stream = sys.stdin
    if stream is None:
        return ""
    buffer = getattr(stream, "buffer", None)
    if buffer is None:  # a text stream put in place by a caller (tests): already decoded
        return check_text(stream.read(), what)
    try:
        data = buffer.read()
    except (OSError, ValueError):  # closed, or not readable
        return ""
    return decode_utf8(data, what)


def unescape(text: str, flag: str) -> str:
    r"""Backslash escapes as Python writes them ("\n", "\t", "\x41", "\u00e9"): shells pass them as two
    characters. A broken escape ("\x", "\u12") is an error that names the flag."""
    if "\\" not in text:
        return text
    try:
        return text.encode("latin-1", "backslashreplace").decode("unicode_escape")
    except UnicodeDecodeError as e:
        raise NanogemmaError(f"{flag} {text!r}: bad escape ({e.reason}); write a backslash itself as \\\\") from None


# ------------------------------------------------------------------------------------------------ writing


def temp_name(target: Path) -> Path:
    """A temporary name beside `target`, owned by this process (see `clean_orphans`)."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


@contextlib.contextmanager
def atomic_path(target: str | Path, folder: bool = False) -> Iterator[Path]:
    """Yield a temporary path to fill (a file, or a folder with `folder`); renamed onto `target` when the
    block ends normally, removed if it raises (a full disk leaves nothing behind)."""
    target = Path(target)
    tmp = temp_name(target)
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        if folder and target.is_dir() and not target.is_symlink():
            old = temp_name(target)
            os.replace(target, old)
            os.replace(tmp, target)
            _remove(old)
        else:
            os.replace(tmp, target)
    except BaseException:
        _remove(tmp)
        raise


def readable(folder: Path) -> None:
    """Files 0644 and the folder 0755 (a temporary folder is made private), before it is published."""
    for f in folder.iterdir():
        f.chmod(0o644)
    folder.chmod(0o755)


def atomic_write(target: str | Path, data: bytes | str) -> Path:
    """Write `data` to `target` under a temporary name, then rename (see `atomic_path`)."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return Path(target)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_orphans(folder: str | Path) -> int:
    """Delete the temporary files and folders (`temp_name`) that killed writers left in `folder`."""
    folder = Path(folder)
    removed = 0
    try:
        entries = list(folder.iterdir())
    except OSError:
        return 0
    for entry in entries:
        m = _TMP.search(entry.name)
        if m and entry.name.startswith(".") and not _alive(int(m.group(1))):
            _remove(entry)
            removed += 1
    return removed


# ------------------------------------------------------------------------------------------------ owning

_HELD: set[str] = set()  # lock files this process holds (a lock with our pid that is not here is stale)


class OutputLock:
    """`with OutputLock(folder, "prepare"):` — the folder is this process's until the block ends.

    The lock is `folder/.nanogemma.lock`, created exclusively, holding the owner's pid, host and command.
    A second process is refused with one line naming the owner. A lock whose process is gone (on this host)
    is stale: it is replaced, and the run goes on.
    """

    def __init__(self, folder: str | Path, command: str) -> None:
        self.folder, self.command = Path(folder), command
        self.path = self.folder / LOCK_FILE
        self.held = False

    def _owner(self) -> dict | None:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return info if isinstance(info, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # cut short while being written, or garbage: stale

    def _stale(self, owner: dict) -> bool:
        pid = owner.get("pid")
        if not isinstance(pid, int):
            return True
        if owner.get("host") not in (None, socket.gethostname()):
            return False  # another machine's process (a shared filesystem): cannot tell, so respect it
        if pid == os.getpid():
            return str(self.path.resolve()) not in _HELD
        return not _alive(pid)

    def acquire(self) -> OutputLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": self.command})
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is None:
                    continue  # released just now: try again
                if not self._stale(owner):
                    raise NanogemmaError(
                        f"{self.folder} is in use by process {owner['pid']} (nanogemma "
                        f"{owner.get('command', '?')}); wait for it to finish or choose another folder "
                        f"(if no such process runs, delete {self.path})") from None
                # Stale: move it aside under a name of our own, so that of two processes finding it stale
                # only one removes it, and retry the exclusive create.
                aside = temp_name(self.path)
                with contextlib.suppress(FileNotFoundError):
                    os.replace(self.path, aside)
                    aside.unlink()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(record)
            self.held = True
            _HELD.add(str(self.path.resolve()))
            return self
        raise NanogemmaError(f"cannot take the lock {self.path}; delete it if no nanogemma process uses the folder")

    def release(self) -> None:
        if self.held:
            _HELD.discard(str(self.path.resolve()))
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.held = False

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# ------------------------------------------------------------------------------------ trusting a cache


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _signature(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def write_manifest(manifest: Path, files: Sequence[Path]) -> None:
    """Record the size and SHA-256 of each of `files` (a cache entry just written) in `manifest`."""
    entries = {}
    for f in files:
        entries[f.name] = {"sha256": sha256_file(f), "checked": _signature(f.stat())}
    atomic_write(manifest, json.dumps({"files": entries}, indent=1))


def manifest_ok(manifest: Path, files: Sequence[Path] | None = None) -> bool:
    """Whether `files` (default: every file the manifest lists, beside it) hold what `manifest` recorded
    (see the module docstring for what it costs)."""
    try:
        entries = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        if files is None:
            files = [manifest.parent / name for name in entries]
        changed = False
        for f in files:
            entry = entries[f.name]
            sig = _signature(f.stat())
            if sig == entry["checked"]:
                continue
            if sha256_file(f) != entry["sha256"]:
                return False
            entry["checked"], changed = sig, True
        if changed:  # the same bytes, rewritten or copied: remember, so the next start only stats them
            with contextlib.suppress(OSError):
                atomic_write(manifest, json.dumps({"files": entries}, indent=1))
        return True
    except (OSError, ValueError, KeyError, TypeError):
        return False


# ------------------------------------------------------------------------------- the operating system


def describe_os_error(e: OSError) -> str:
    """One line for an OSError that reached the command line: which file, what went wrong, what to do."""
    names = " -> ".join(str(n) for n in (e.filename, e.filename2) if n is not None)
    where = f"{names}: " if names else ""
    what = e.strerror or str(e) or type(e).__name__
    hint = {
        errno.ENOSPC: "free some disk space and run again (nothing incomplete was kept)",
        errno.EDQUOT: "free some space within your quota and run again",
        errno.EROFS: "the filesystem is read-only; choose a writable folder",
        errno.EACCES: "check the permissions, or choose another folder",
        errno.EPERM: "check the permissions, or choose another folder",
        errno.ENOENT: "check the path (was it moved or deleted while nanogemma ran?)",
        errno.EISDIR: "a folder is in the way where a file belongs; pass a file path",
        errno.ENOTDIR: "a file is in the way where a folder belongs; choose another path",
        errno.EEXIST: "something is already there; remove it or choose another path",
        errno.ENAMETOOLONG: "use a shorter path",
    }.get(e.errno or 0, "check the path and the disk")
    return f"{where}{what}; {hint}"
