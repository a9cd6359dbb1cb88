"""Files that root writes where a sandbox might point it: outputs, verdicts, captures, spool, registrations.

The rules, the way OpenSSH's StrictModes checks a home directory:
- Never follow a symbolic link to the file itself (O_NOFOLLOW), and never open anything but a regular file.
- Refuse an existing file that root (or, for replay without root, the caller) does not own, or that has other
  hard links: appending to it would write where its owner chose.
- Refuse a path any of whose directories, from / down, is owned by someone else or is writable by others (the
  world, or a group that is not a system group) without the sticky bit: whoever can write there can swap the file
  or a directory on the way to it between the check and the open.
- Files that hold argv and payload bytes are 0600, eptrace's own directories 0700.
- /dev/null is the one exception (benchmarks and dry runs write there): opened as it is, never chmod-ed or
  renamed over.
Each refusal is an UnsafePathError with a one-line message that names the path and says why.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

# A directory its group can write is trusted when the group is a system group (Debian's SYS_GID_MAX is 999):
# Ubuntu's /var/log is root:syslog 0775. A user's group (a sandbox's user may be in it) is not trusted.
SYSTEM_GID_LIMIT = 1000
PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
DEVNULL = Path(os.devnull)


class UnsafePathError(Exception):
    """A path root must not write to; the message is one line for the user."""


def _trusted_owners() -> tuple[int, ...]:
    return (0, os.geteuid())


def _check_directory_chain(directory: Path, what: str) -> None:
    """Every directory from / down to directory: owned by a trusted user, not writable by others unless sticky."""
    chain = [directory, *directory.parents]
    for d in reversed(chain):
        try:
            st = os.lstat(d)
        except FileNotFoundError:
            raise UnsafePathError(f"{what} {directory}: directory {d} does not exist; create it first") from None
        except OSError as e:
            raise UnsafePathError(f"{what} {directory}: cannot check directory {d}: {e.strerror}") from None
        if stat.S_ISLNK(st.st_mode):
            continue          # its own directory was checked; the real path is checked below
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(f"{what} {directory}: {d} is not a directory")
        if st.st_uid not in _trusted_owners():
            raise UnsafePathError(f"{what} {directory}: directory {d} is owned by uid {st.st_uid}, not root; "
                                  "choose a directory only root can write to")
        others_write = st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and st.st_gid >= SYSTEM_GID_LIMIT)
        if others_write and not st.st_mode & stat.S_ISVTX:
            raise UnsafePathError(f"{what} {directory}: directory {d} is writable by others (mode "
                                  f"{stat.S_IMODE(st.st_mode):04o}) without the sticky bit; "
                                  "choose a directory only root can write to")


def check_directory(directory: str | os.PathLike, what: str) -> Path:
    """The directory as an absolute path, after checking it and every directory above it (and its real path)."""
    lexical = Path(os.path.abspath(directory))
    _check_directory_chain(lexical, what)
    real = Path(os.path.realpath(lexical))
    if real != lexical:
        _check_directory_chain(real, what)
    return lexical


def _check_existing(st: os.stat_result, path: Path, what: str) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(f"{what} {path} is a symbolic link; eptrace does not follow links: give the real path")
    if stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(f"{what} {path} is a directory; give a file path")
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePathError(f"{what} {path} is not a regular file")
    if st.st_uid not in _trusted_owners():
        raise UnsafePathError(f"{what} {path} exists and is owned by uid {st.st_uid}, not root; "
                              "eptrace does not write to files others own")
    if st.st_nlink > 1:
        raise UnsafePathError(f"{what} {path} has {st.st_nlink} hard links; eptrace writes only to a file of its own")


def check_target(path: str | os.PathLike, what: str) -> Path:
    """Check, without creating anything, that a file may be written at path (its directories, and the file if
    it exists). Call it for every path before anything is made, so that a bad one leaves nothing behind."""
    path = Path(os.path.abspath(path))
    if path == DEVNULL:
        return path
    if path.name in ("", ".", ".."):
        raise UnsafePathError(f"{what} {path} is a directory; give a file path")
    check_directory(path.parent, what)
    try:
        _check_existing(os.lstat(path), path, what)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise UnsafePathError(f"{what} {path}: {e.strerror}") from None
    return path


def open_for_writing(path: str | os.PathLike, what: str, mode: int = PRIVATE_FILE, append: bool = True,
                     group: int | None = None) -> int:
    """An fd open for writing (appending, or from the start) on a regular file of root's, made with mode if it
    is new; the mode (and group) is set on an existing file too. Raises UnsafePathError, OSError."""
    path = check_target(path, what)
    if path == DEVNULL:
        return os.open(DEVNULL, os.O_WRONLY | os.O_CLOEXEC)
    fd = os.open(path, _WRITE_FLAGS | (os.O_APPEND if append else os.O_TRUNC), mode)
    try:
        _check_existing(os.fstat(fd), path, what)     # what was opened, not what was checked
        if group is not None:
            os.fchown(fd, -1, group)
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


class AtomicFile:
    """A file written under a temporary name in the target's directory and renamed over it by commit():
    a reader sees the whole file or none, and a link planted at the target is replaced, never followed."""

    def __init__(self, path: str | os.PathLike, what: str, mode: int = PRIVATE_FILE):
        self.path = check_target(path, what)
        self.what = what
        if self.path == DEVNULL:
            self.tmp = None
            self.file = open(DEVNULL, "wb")
            return
        self.tmp = self.path.with_name(f".{self.path.name}.{os.urandom(4).hex()}.tmp")
        fd = os.open(self.tmp, _WRITE_FLAGS | os.O_EXCL, mode)
        os.fchmod(fd, mode)
        self.file = os.fdopen(fd, "wb")

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def commit(self, durable: bool = True) -> None:
        """Flush, sync (unless not durable: then only a host crash, not a process's death, can lose it) and
        rename over the target (checked again: it may have appeared since)."""
        if self.file.closed:
            return
        if self.tmp is None:
            self.file.close()
            return
        try:
            self.file.flush()
            if durable:
                os.fsync(self.file.fileno())
            self.file.close()
            check_target(self.path, self.what)
            os.rename(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if not self.file.closed:
            self.file.close()
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike, data: bytes, what: str, mode: int = PRIVATE_FILE,
                     durable: bool = True) -> None:
    f = AtomicFile(path, what, mode)
    try:
        f.write(data)
    except BaseException:
        f.abort()
        raise
    f.commit(durable)


def private_dir(path: str | os.PathLike, what: str) -> Path:
    """path as a directory of eptrace's own, mode 0700, made (with missing parents, 0700) if needed.
    Raises UnsafePathError when it is something else, unsafe, or cannot be made (a read-only file system)."""
    path = Path(os.path.abspath(path))
    missing = []
    d = path
    while not os.path.lexists(d):
        missing.append(d)
        d = d.parent
    check_directory(d, what)            # the part that exists, whatever it is, before making anything in it
    for d in reversed(missing):
        try:
            os.mkdir(d, PRIVATE_DIR)
        except FileExistsError:
            pass
        except OSError as e:
            raise UnsafePathError(f"{what} {path}: cannot make directory {d}: {e.strerror}") from None
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(f"{what} {path} is not a directory (a file or a link is in its place)")
        if stat.S_IMODE(st.st_mode) != PRIVATE_DIR:
            os.chmod(path, PRIVATE_DIR, follow_symlinks=False)
        if not os.access(path, os.W_OK) or os.statvfs(path).f_flag & os.ST_RDONLY:
            raise UnsafePathError(f"{what} {path} is read-only; give a writable directory")
    except OSError as e:
        raise UnsafePathError(f"{what} {path}: {e.strerror}") from None
    return check_directory(path, what)


def check_private_dir(path: str | os.PathLike, what: str) -> Path:
    """What private_dir would refuse, checked without making anything: a file or link in the directory's place,
    a read-only directory, an unsafe directory above it."""
    path = Path(os.path.abspath(path))
    d = path
    while not os.path.lexists(d):
        d = d.parent
    if d == path:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(f"{what} {path} is not a directory (a file or a link is in its place)")
    else:
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(f"{what} {path}: {d} is not a directory")
    check_directory(d, what)
    if os.statvfs(d).f_flag & os.ST_RDONLY or not os.access(d, os.W_OK):
        raise UnsafePathError(f"{what} {path} is read-only; give a writable directory")
    return path


def open_for_reading(path: str | os.PathLike) -> int:
    """An fd for reading a file eptrace wrote itself: never through a link."""
    return os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
