"""Output files: the one way shmmmu writes a file a user names -- never through a link, checked before the work.

Every output path a command takes (`--tracepoints` of run, stress and explore,
`explore --svg`, `trace record -o`, `trace convert -o`) is `check()`ed before
the work starts, so a missing directory, a directory, a link, a FIFO or a place
shmmmu cannot write is one line before a long run or search; then it is
written through `output()`.  A regular file is written as a temporary file
beside it (created O_EXCL under a name nobody can guess) and renamed over it
when complete: a symlink or a hard link that another user planted at the name
(in /tmp, with fs.protected_symlinks=0 or protected_hardlinks=0) is replaced,
never written through, and an interrupted or failed write leaves the old file
as it was.  A character device (/dev/null, /dev/full) is written in place,
opened with O_NOFOLLOW.  A write that fails (a full disk, /dev/full) raises
OutputError like a refusal does: one line, exit status 2.
"""
from __future__ import annotations

import os
import stat
import tempfile
from contextlib import contextmanager
from typing import IO, Iterator


class OutputError(ValueError):
    """An output file that cannot be written, or whose writing failed: one line, exit status 2."""


def _kind(mode: int) -> str | None:
    """Why a file of this type is no output (None: it is one: a regular file or a character device)."""
    if stat.S_ISLNK(mode):
        return "is a symbolic link (refused: a link in a shared directory can point at anyone's file)"
    if stat.S_ISDIR(mode):
        return "is a directory"
    if stat.S_ISFIFO(mode):
        return "is a FIFO"
    if stat.S_ISSOCK(mode):
        return "is a socket"
    if stat.S_ISBLK(mode):
        return "is a block device"
    return None


def _lstat(path: str) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}") from None


def check(path: str) -> str:
    """Can `path` be written?  Said before the work: a refusal is an OutputError; returns `path`."""
    if not path:
        raise OutputError("an output file needs a name")
    st = _lstat(path)
    if st is not None and (why := _kind(st.st_mode)):
        raise OutputError(f"cannot write {path}: it {why}")
    if st is not None and stat.S_ISCHR(st.st_mode):
        if not os.access(path, os.W_OK):
            raise OutputError(f"cannot write {path}: Permission denied")
        return path
    parent = os.path.dirname(os.path.abspath(path))
    if st is not None and st.st_uid != os.geteuid() and os.geteuid() != 0:
        try:
            pst = os.stat(parent)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror}") from None
        if pst.st_mode & stat.S_ISVTX and pst.st_uid != os.geteuid():     # rename() over it would be refused
            raise OutputError(f"cannot write {path}: it belongs to another user (in a sticky directory)")
    try:                                       # the temporary file output() renames: the real test
        tempfile.TemporaryFile(dir=parent, prefix=".shmmmu-check-").close()
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}") from None
    return path


def scratch_dir(path: str) -> str:
    """Where the temporary files of work whose result becomes `path` go: beside it (one file system, so the
    last step is a rename), or the temporary directory when `path` is a device."""
    st = _lstat(path)
    if st is not None and stat.S_ISCHR(st.st_mode):
        return tempfile.gettempdir()
    return os.path.dirname(os.path.abspath(path))


class Output:
    """The file being written: write() turns a failed write into OutputError (the file's own, named)."""

    def __init__(self, f: IO, path: str):
        self.file = f
        self.path = path

    def write(self, data: str | bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e.strerror}") from None

    def fileno(self) -> int:
        return self.file.fileno()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def output(path: str, mode: str = "w") -> Iterator[Output]:
    """Write `path` ("w" text, "wb" binary): complete when the `with` ends without an exception, else
    left as it was (a device: what was written stays written)."""
    check(path)
    st = _lstat(path)
    if st is not None and stat.S_ISCHR(st.st_mode):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror}") from None
        f = os.fdopen(fd, mode)
        try:
            yield Output(f, path)
            _close(f, path)
        finally:
            _discard(f)
        return
    directory, base = os.path.split(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".part", dir=directory)
        os.fchmod(fd, 0o666 & ~_umask())       # what open() would have given the file
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}") from None
    f = os.fdopen(fd, mode)
    done = False
    try:
        yield Output(f, path)
        _close(f, path)
        try:
            os.replace(tmp, path)              # replaces a link planted at `path`, never follows it
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror}") from None
        done = True
    finally:
        _discard(f)
        if not done:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _close(f: IO, path: str) -> None:
    """Close `f`: what sat in its buffer is written now, and a failure here is the write's failure."""
    try:
        f.close()
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}") from None


def _discard(f: IO) -> None:
    """Close `f` after a failure without a second error (its buffer may be what could not be written)."""
    if not f.closed:
        try:
            f.close()
        except OSError:
            pass


def write(path: str, data: str | bytes) -> None:
    """`path` holds `data` (text or bytes), written as output() writes."""
    with output(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
