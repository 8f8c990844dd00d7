"""Files: atomic replacement (a crash leaves the old content or the new, never a mix) and content hashes."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Sequence


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


# ------------------------------------------------------------------------------------ folder walks

def access_error(path: Path | str, e: BaseException, what: str = "an image"):
    """The one-line ImageReadError for a file that cannot be opened at all (a folder, missing, not
    readable), or None when `e` is a fault of the file's content, for the reader to word."""
    from ..errors import ImageReadError

    if isinstance(e, IsADirectoryError):
        return ImageReadError(f"{path}: is a folder, not {what}")
    if isinstance(e, FileNotFoundError):
        return ImageReadError(f"{path}: file not found")
    if isinstance(e, PermissionError):
        return ImageReadError(f"{path}: not readable (permission denied)")
    return None


# Files and folders that operating systems and archivers leave beside users' images: never data.
OS_DEBRIS = frozenset({"__macosx", "thumbs.db", "ehthumbs.db", "desktop.ini", "$recycle.bin",
                       "system volume information", "lost+found"})


def is_debris(name: str) -> bool:
    """Hidden entries (.DS_Store, ._x AppleDouble files, .git...) and OS/archiver debris, skipped silently."""
    return name.startswith(".") or name.lower() in OS_DEBRIS


def walk_files(folder: Path, keep: Callable[[Path], bool]) -> list[Path]:
    """Every file under `folder` that `keep` accepts, sorted, following symlinked folders as users expect.

    Each real folder is entered once (by device and inode), so two links to one folder do not list an image
    twice, and a link back to `folder` or above it (a cycle) is not followed at all: it would loop, or list
    sibling folders' images under this one. Hidden files and OS debris are skipped. Paths keep the names the
    user sees (the link's, not its target's)."""
    out: list[Path] = []
    seen: set[tuple[int, int]] = set()
    stack = [Path(folder)]
    while stack:
        d = stack.pop()
        try:
            st = d.stat()
        except OSError:
            continue  # a dangling link
        if (st.st_dev, st.st_ino) in seen:
            continue
        seen.add((st.st_dev, st.st_ino))
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)  # the same walk, and names, every time
        except OSError:
            continue  # unreadable folder: its images are simply not there
        for e in entries:
            if is_debris(e.name):
                continue
            try:
                is_dir = e.is_dir()  # follows symlinks
            except OSError:
                continue
            p = Path(e.path)
            if is_dir:
                if not (e.is_symlink() and _points_up(p)):
                    stack.append(p)
            elif keep(p):
                out.append(p)
    return sorted(out)


def _points_up(link: Path) -> bool:
    """Whether a symlinked folder leads to one of the folders it sits in, as the user's path names them."""
    target = link.resolve()
    return any(target == a.resolve() for a in link.absolute().parents)


def sub_folders(folder: Path) -> list[Path]:
    """The folders (symlinked ones too) directly inside `folder`, debris and hidden ones left out, sorted."""
    return sorted(Path(e.path) for e in os.scandir(folder) if not is_debris(e.name) and _is_dir(e))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False
