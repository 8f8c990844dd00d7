"""Files: atomic replacement (a crash leaves the old content or the new, never a mix) and content hashes."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_save_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; on success it replaces `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_folder(dest: Path) -> Iterator[Path]:
    """Build a folder under a sibling temporary name, then swap it in whole.

    The swap is two renames (old -> aside, new -> dest); between them `dest` is briefly absent but
    never mixed. A leftover aside folder from a crash in that instant is restored by `recover_folder`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.new-", dir=dest.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    for f in tmp.rglob("*"):
        if f.is_file():
            os.chmod(f, 0o666 & ~_umask())
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    aside = dest.with_name(f".{dest.name}.old")
    if dest.exists():
        os.replace(dest, aside)
    os.replace(tmp, dest)
    _fsync_dir(dest.parent)
    shutil.rmtree(aside, ignore_errors=True)


def recover_folder(dest: Path, drop_temps: bool = True) -> None:
    """Undo a swap that was cut between its two renames, and drop abandoned temporary folders.

    Readers pass drop_temps=False: they only put a lone aside folder back, and leave `.NAME.new-*`
    folders alone (one may belong to an export in progress); the next export removes them.
    """
    dest = Path(dest)
    aside = dest.with_name(f".{dest.name}.old")
    if aside.exists():
        if dest.exists():
            if drop_temps:
                shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, dest)
    if drop_temps and dest.parent.exists():
        for stale in dest.parent.glob(f".{dest.name}.new-*"):
            shutil.rmtree(stale, ignore_errors=True)


def hash_files(paths: Sequence[str], workers: int = 4) -> list[tuple[str | None, str]]:
    """(SHA-256 hex or None, error) per path, in order; hashlib drops the GIL, so threads help."""
    def one(p: str) -> tuple[str | None, str]:
        try:
            return sha256_file(Path(p)), ""
        except OSError as e:
            return None, f"{p}: cannot read the file ({type(e).__name__}: {e.strerror or e})"

    if workers <= 1:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, paths))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_key(paths: Sequence[str], extra: str) -> str:
    """A key that changes when any file's content, path or `extra` does (SHA-256 of the SHA-256s)."""
    h = hashlib.sha256(extra.encode())
    for p, (digest, err) in zip(paths, hash_files(paths)):
        if digest is None:
            raise OSError(err)
        h.update(f"{p}|{digest}|".encode())
    return h.hexdigest()[:32]
