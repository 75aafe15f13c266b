"""Safe paths: checking what a command reads and writes, and writing files atomically.

A reader gets a one-line error that says what a path is when it is not a regular file; a writer never
replaces a device node or FIFO, and with ``exclusive`` never replaces a file another process wrote
meanwhile. No torch here: the CLI can check paths before importing it.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import SettingError

__all__ = [
    "atomic_write",
    "check_distinct_paths",
    "check_log_path",
    "check_output_path",
    "read_metadata",
    "require_file",
]


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """``path`` as a Path if it is a readable regular file; else a one-line error that says what it is.

    Raises:
        FileNotFoundError: nothing there.
        ValueError: a directory, a symlink loop, a name too long, or not a regular file.
    """
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as exc:  # ELOOP, ENAMETOOLONG, ...
        raise ValueError(f"{path}: {exc.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ValueError(f"{path} is a directory, not a {what}")
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{path} is not a regular file")
    return path


def _exists(path: Path) -> bool:
    return os.path.lexists(path)


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Check that ``path`` can be written, before any work is done.

    Raises:
        ValueError: the directory is missing or not writable, the name is too long, the path exists and
            is not a regular file (a device, a FIFO: never replaced), or it exists without ``overwrite``.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if len(os.fsencode(path.name)) > 255:
        raise ValueError(
            f"output file name is {len(os.fsencode(path.name))} bytes, over the 255 the file system allows"
        )
    if path.is_dir():
        raise ValueError(f"output {path} is a directory; give a file name")
    if not parent.is_dir():
        raise ValueError(f"output directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"output directory {parent} is not writable; choose another path for {path.name}")
    if _exists(path) and not (path.is_file() or path.is_symlink()):
        raise ValueError(f"output {path} exists and is not a regular file; choose another path")
    if _exists(path) and not overwrite:
        raise SettingError(f"output {path} exists; pass `overwrite` to replace it")
    return path


def check_log_path(path: str | os.PathLike) -> Path:
    """Check, before any work, that a log file can be appended to (it is created if missing).

    Raises:
        ValueError: a directory, a missing or unwritable directory, or an unwritable file.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise ValueError(f"log {path} is a directory; give a file name")
    if not parent.is_dir():
        raise ValueError(f"log directory {parent} does not exist; create it first")
    if _exists(path) and not os.access(path, os.W_OK) or not _exists(path) and not os.access(parent, os.W_OK):
        raise ValueError(f"log {path} is not writable; choose another path")
    return path


def _same(a: Path, b: Path) -> bool:
    """Whether two paths name one file: the same resolved path, or (both existing) the same inode."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_distinct_paths(
    outputs: dict[str, str | os.PathLike | None], inputs: dict[str, str | os.PathLike | None] | None = None
) -> None:
    """Refuse, before any work, an output that is also an input or another output of the same command.

    Args:
        outputs: What the command writes, by the name the user knows it by (``-o``, ``--plot``).
        inputs: What it reads, likewise; ``None`` values are skipped in both.

    Raises:
        ValueError: two of them name one file (``--overwrite`` does not change that).

    Example:
        >>> check_distinct_paths({"-o": "a.safetensors", "--plot": "a.safetensors"})
        Traceback (most recent call last):
        ...
        ValueError: --plot a.safetensors is also the -o file; give each output its own path
    """
    named_out = [(k, Path(v)) for k, v in outputs.items() if v is not None]
    named_in = [(k, Path(v)) for k, v in (inputs or {}).items() if v is not None]
    for i, (name, path) in enumerate(named_out):
        for other, other_path in named_out[:i]:
            if _same(path, other_path):
                raise ValueError(f"{name} {path} is also the {other} file; give each output its own path")
        for other, other_path in named_in:
            if _same(path, other_path):
                raise ValueError(f"{name} {path} is the {other} file this command reads; choose another path")


def _publish(tmp_path: Path, path: Path, exclusive: bool) -> None:
    """Give ``tmp_path`` its final name: replacing what is there, or (``exclusive``) only if nothing is,
    checked atomically by the file system (a hard link fails if the name exists)."""
    if _exists(path) and not (path.is_file() or path.is_symlink()):
        raise ValueError(f"output {path} exists and is not a regular file; nothing was written")
    if not exclusive:
        os.replace(tmp_path, path)
        return
    try:
        os.link(tmp_path, path)
    except FileExistsError:
        raise SettingError(
            f"output {path} appeared while this command ran (another process?); nothing was written; "
            "pass `overwrite` or another `output` path"
        ) from None
    except OSError:  # a file system without hard links: claim the name exclusively, then replace it
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            raise ValueError(f"output {path} appeared while this command ran; nothing was written") from None
        os.close(fd)
        os.replace(tmp_path, path)
        return
    tmp_path.unlink()


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, else remove it.

    A crash or Ctrl-C at any point leaves either the old file or the new one, never a partial file.
    With ``exclusive`` the rename happens only if ``path`` does not exist at that moment, so two
    writers that both checked for it earlier cannot replace each other's file.

    Raises:
        ValueError: ``path`` is not a regular file, or (``exclusive``) it exists by the time of the rename.
        OSError: the disk is full or the directory unwritable (the temporary is removed).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name[:200]}.", suffix=".tmp", dir=path.parent if str(path.parent) else "."
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates 0600 files; give the result the mode a plain open() would (or the old file's).
        if path.is_file():
            mode = path.stat().st_mode & 0o777
        else:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp_path, mode)
        _publish(tmp_path, path, exclusive)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header


def _bad(path: Path, problem: str) -> ValueError:
    return ValueError(f"{path}: {problem}")


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a safetensors file, with the header validated.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a valid safetensors file.
    """
    path = require_file(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _bad(path, "not a safetensors file (shorter than its 8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > min(_MAX_HEADER, size - 8):
            raise _bad(path, "not a safetensors file (header length past the end of the file)")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _bad(path, "not a safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise _bad(path, "not a safetensors file (header is not a JSON object)")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _bad(path, "safetensors metadata must map strings to strings")
    return meta


def mismatch_detail(missing: list[str], unexpected: list[str], noun: str = "tensors") -> str:
    """``missing 3 tensors (e.g. a.weight); unexpected 1 tensors (e.g. b)`` for a state dict that does not fit."""
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} {noun} (e.g. {missing[0]})")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} {noun} (e.g. {unexpected[0]})")
    return "; ".join(parts)
