"""One writer per folder: the exclusive lock a stage holds on every folder it writes.

    with hold(run_dir, "the run folder", "choose another train.run_dir"):
        ...   # a second process asking for run_dir is refused in one sentence naming this one

The lock is the file `<folder>/.writer.lock` (layout.LOCK), holding a JSON record of its holder
(host, pid, the process's start time, a random token, the command, since when).

- Where the filesystem has `flock` (the default), the lock is a `flock` on that file: the kernel
  drops it when its holder dies however it dies, so a lock left by a killed process is simply free,
  and the next writer takes it over (and says so). A clean release deletes the file.
- Where `flock` is unavailable (some network filesystems answer ENOLCK or EOPNOTSUPP; force it with
  SAE_PIPELINE_LOCK=file), the file's existence is the lock. It is created in one step with
  everything in it (a complete temporary file hard-linked to the lock's name, which fails when the
  name exists: O_EXCL semantics), so a reader never sees half a record. A record left by a process
  that is no longer running on this host (pid gone, a zombie, or a pid reused by a process started
  at another time) is stale and taken over; taking over is serialised by a second such file
  (`.writer.lock.takeover`) and removes the stale record only if it is still the very one read.
  A holder on another host cannot be checked: it is refused, and the sentence names the lock file
  to delete if that process is gone.

The two kinds meet safely on one folder: a `flock` holder that finds a live file-kind record in the
file refuses as well. Under data-parallel training rank 0 alone writes, so rank 0 alone locks
(`Distributed.on_main` hands its refusal to the other ranks).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import sys
import uuid
from pathlib import Path

from sae_pipeline import layout
from sae_pipeline.errors import UserError

try:  # not on every platform
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

# what flock answers on a filesystem that does not implement it
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}
_TRIES = 8  # attempts when the lock file changes under us (released or taken over meanwhile)


class FolderBusy(UserError):
    """Another live process holds the folder's lock."""


def lock_path(folder: Path) -> Path:
    return Path(folder) / layout.LOCK


def is_lock_file(path: Path) -> bool:
    """The lock file or one of its helpers (what folder clean-ups must leave alone)."""
    return Path(path).name.startswith(layout.LOCK)


def _use_flock() -> bool:
    return fcntl is not None and os.environ.get("SAE_PIPELINE_LOCK", "flock") != "file"


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time in clock ticks since boot) of a local process from /proc, or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], fields[19]


def _my_record(what: str) -> dict:
    stat = _proc_stat(os.getpid())
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "start": stat[1] if stat else None,
        "token": uuid.uuid4().hex,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300] if sys.argv else "",
        "what": what,
        "since": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }


def alive(record: dict) -> bool | None:
    """Whether the holder named by `record` still runs: None when that cannot be told (another host)."""
    if record.get("host") != socket.gethostname() or not isinstance(record.get("pid"), int):
        return None
    pid = record["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return True  # no /proc to ask: the pid exists
    state, start = stat
    if state in ("Z", "X"):  # killed, not yet reaped by its parent
        return False
    return record.get("start") in (None, start)  # a different start time: the pid was reused


def _parse(text: str) -> dict:
    try:
        record = json.loads(text)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _read(path: Path) -> dict | None:
    """The record in a lock file; None when there is no file, {} when it holds no readable record."""
    try:
        return _parse(Path(path).read_text())
    except FileNotFoundError:
        return None


def _read_fd(fd: int) -> dict:
    return _parse(os.pread(fd, 1 << 16, 0).decode("utf-8", "replace"))


def _create(path: Path, record: dict) -> bool:
    """Create `path` holding `record`, complete, in one step; False when it already exists."""
    tmp = path.with_name(f"{path.name}.{record['token']}.tmp")
    tmp.write_text(json.dumps(record))
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError as err:  # a filesystem without hard links: O_EXCL create, then write
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK):
            raise
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(record))
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _unlink_if(path: Path, record: dict) -> None:
    """Delete `path` if it still holds `record` (compared with its random token)."""
    found = _read(path)
    if found and found.get("token") == record.get("token"):
        path.unlink(missing_ok=True)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def _holder_words(record: dict | None) -> str:
    if not record or "pid" not in record:
        return "another process (its lock file names no holder)"
    command = f"{record['command'].split()[0]}, " if record.get("command") else ""
    return f"another process ({command}pid {record['pid']} on host {record.get('host')}, since {record.get('since')})"


class FolderLock:
    """The exclusive lock on one folder; `acquire` raises FolderBusy naming the live holder."""

    def __init__(self, folder: Path, what: str = "the folder", hint: str = "choose another folder"):
        self.folder, self.what, self.hint = Path(folder), what, hint
        self.path = lock_path(self.folder)
        self.record = _my_record(what)
        self.fd: int | None = None
        self.held = self.made = False
        self.taken_over: dict | None = None  # the record of a dead holder this lock replaced

    # ---- refusing ---------------------------------------------------------------------------------
    def busy(self, record: dict | None) -> FolderBusy:
        unknown = alive(record or {}) is None
        gone = f" (if that process is gone, delete {self.path})" if unknown else ""
        return FolderBusy(
            f"{self.what} {self.folder} is being written by {_holder_words(record)}{gone}; "
            f"wait for it to finish or {self.hint}"
        )

    # ---- taking and giving back ---------------------------------------------------------------------
    def acquire(self) -> FolderLock:
        self.made = not self.folder.exists()  # then an empty folder is removed again on release
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            if not (_use_flock() and self._acquire_flock()):
                self._acquire_file()
        except BaseException:
            self._remove_if_made()
            raise
        self.held = True
        if self.taken_over and self.taken_over.get("pid") is not None:
            print(
                f"note: {self.what} {self.folder} was locked by pid {self.taken_over['pid']} on host "
                f"{self.taken_over.get('host')}, which is no longer running; its lock was taken over",
                file=sys.stderr,
            )
        return self

    def _acquire_flock(self) -> bool:
        """Take the flock; False when the filesystem has none (the file kind is used instead)."""
        for _ in range(_TRIES):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                record = _read_fd(fd)
                os.close(fd)
                raise self.busy(record) from None
            except OSError as err:
                os.close(fd)
                if err.errno in _NO_FLOCK:
                    return False
                raise
            if not _same_file(fd, self.path):  # released (deleted) between our open and our flock
                os.close(fd)
                continue
            previous = _read_fd(fd)
            if previous.get("kind") == "file" and alive(previous) is not False:
                os.close(fd)  # a live holder that could not flock: it holds the folder
                raise self.busy(previous)
            self.taken_over = previous or None
            data = json.dumps({**self.record, "kind": "flock"}).encode()
            os.ftruncate(fd, 0)
            try:
                os.pwrite(fd, data, 0)
            except OSError as err:  # full disk: the flock holds without the record (which only names it)
                if err.errno != errno.ENOSPC:
                    os.close(fd)
                    raise OSError(err.errno, err.strerror, str(self.path)) from None
            self.fd = fd
            return True
        raise self.busy(_read(self.path))

    def _acquire_file(self) -> None:
        record = {**self.record, "kind": "file"}
        other: dict | None = None
        for _ in range(_TRIES):
            if _create(self.path, record):
                self.record = record
                return
            other = _read(self.path)
            if other is None:  # released meanwhile
                continue
            if alive(other) is not False:
                raise self.busy(other)
            if self._remove_stale(other):
                self.taken_over = other
        raise self.busy(other)

    def _remove_stale(self, stale: dict) -> bool:
        """Delete the stale record `stale`, one taker at a time; True if this process deleted it."""
        mutex = self.path.with_name(self.path.name + ".takeover")
        if not _create(mutex, self.record):
            holder = _read(mutex)
            if holder is not None and alive(holder) is False:  # a taker killed in the middle
                _unlink_if(mutex, holder)
            return False
        try:
            found = _read(self.path)
            if found is not None and found.get("token") == stale.get("token"):
                self.path.unlink()
                return True
            return False
        finally:
            _unlink_if(mutex, self.record)

    def _remove_if_made(self) -> None:
        if self.made:
            with contextlib.suppress(OSError):  # not empty: something was written after all
                self.folder.rmdir()

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self.fd is not None:
            if _same_file(self.fd, self.path):
                self.path.unlink(missing_ok=True)  # while still holding it: no one can take the old file
            os.close(self.fd)
            self.fd = None
        else:
            _unlink_if(self.path, self.record)
        self._remove_if_made()

    def __enter__(self) -> FolderLock:
        return self.acquire() if not self.held else self

    def __exit__(self, *exc) -> None:
        self.release()


def hold(folder: Path, what: str = "the folder", hint: str = "choose another folder") -> FolderLock:
    """The folder's lock, taken (FolderBusy when a live process holds it); release it or use `with`."""
    return FolderLock(folder, what, hint).acquire()


def holder(folder: Path) -> dict | None:
    """The record of the live process holding `folder`'s lock, or None (free, or left by a dead one).

    Looks without taking: a flock is tested shared, so two processes looking at once do not collide."""
    path = lock_path(folder)
    if _use_flock():
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            record = _read_fd(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return record or {}
            except OSError as err:
                if err.errno not in _NO_FLOCK:
                    raise
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
                if record.get("kind") != "file":
                    return None
        finally:
            os.close(fd)
    record = _read(path)
    if record is None or alive(record) is False:
        return None
    return record
