"""One process writes a run directory at a time: ``<run>/train.lock``.

Everything that writes into a run directory holds its lock while it does: training (``sleepzoo train``,
``demo``, ``sweep``, :func:`sleepzoo.train.train` itself) and ``sleepzoo eval`` (which writes eval.json).
A process that finds the lock held by another live process refuses to start.

The lock file holds ``{"pid", "host", "started", "token"}``. It is written whole under a temporary name and
then hard-linked to ``train.lock``; the link fails if the name exists, so taking the lock is atomic and
nobody ever sees a half-written one. A lock that is stale (its process, on this host, is gone) or damaged
(empty or garbage, e.g. left by a disk that filled up) is taken over: it is renamed to a unique name, the
renamed file is checked to be the very one judged stale (same inode, same bytes; otherwise it was a fresh
lock and is put back), and the lock is then created again exclusively. Of several processes that find the
same stale lock, exactly one takes it; the others find the winner's lock and refuse.

    with RunLock("runs/x"):
        ...  # write runs/x
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

from .registry import SleepzooError

_TAKEOVER_EXPIRY_S = 10.0  # a takeover file older than this was left by a starter that died holding it

LOCK_NAME = "train.lock"
#: A lock file that does not parse is taken over only when older than this: on a file system without hard
#: links the lock is created and then written, and a starter must not take a lock being written right now.
DAMAGED_AFTER_S = 2.0


class RunBusy(SleepzooError):
    """The run directory is being written by another live process."""

    def __init__(self, message: str, holder: dict[str, Any]):
        super().__init__(message)
        self.holder = holder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    except (OverflowError, ValueError):  # not a pid at all
        return False
    return True


def _parse(raw: bytes) -> dict[str, Any] | None:
    """The lock record in ``raw``, or None when it is not one (empty, garbage, fields missing)."""
    try:
        holder = json.loads(raw.decode())
        holder["pid"], holder["host"] = int(holder["pid"]), str(holder["host"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    return holder


def _stale(holder: dict[str, Any] | None, raw: bytes, age_s: float) -> str | None:
    """Why a lock with this content can be taken over, or None when its holder may be alive."""
    if holder is None:
        if age_s < DAMAGED_AFTER_S:
            return None  # most likely being written right now
        what = "empty" if not raw.strip() else "not a lock record"
        return f"it was {what} (a process that could not finish writing it, e.g. on a full disk)"
    if holder["host"] == socket.gethostname() and not _alive(holder["pid"]):
        started = holder.get("started")
        when = f", started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" \
            if isinstance(started, (int, float)) else ""
        return f"its process (pid {holder['pid']} on {holder['host']}{when}) is gone"
    return None


def _read(path: Path) -> tuple[bytes, int, float] | None:
    """``(content, inode, age in seconds)`` of the lock file, or None when there is none."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            return f.read(), st.st_ino, time.time() - st.st_mtime
    except FileNotFoundError:
        return None


def lock_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """Who writes ``run_dir`` right now (``{"pid", "host", "started", "path"}``), or None when nobody does
    (no lock, or a stale or damaged one)."""
    path = Path(run_dir) / LOCK_NAME
    found = _read(path)
    if found is None:
        return None
    raw, _, age = found
    holder = _parse(raw)
    if _stale(holder, raw, age) is not None:
        return None
    return {**(holder or {"pid": None, "host": "?"}), "path": str(path)}


class RunLock:
    """``with RunLock(run_dir):`` (or ``acquire()`` / ``release()``): hold ``run_dir``'s lock, creating the
    directory if needed; :class:`RunBusy` when another live process holds it. A directory the lock created
    and nothing else filled is removed again on release (a refused run leaves no trace)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False
        self.created = False
        self.token = uuid.uuid4().hex

    def acquire(self) -> "RunLock":
        self.created = not self.path.parent.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._acquire()
        except BaseException as exc:
            self._give_up_dir()
            if isinstance(exc, OSError):
                raise SleepzooError(f"cannot lock the run directory {str(self.path.parent)!r}: {exc}") from None
            raise
        return self

    def _acquire(self) -> None:
        took_over = None
        for _ in range(100):
            if self._create():
                self.held = True
                if took_over:
                    print(f"note: took over the lock {self.path}: {took_over}", flush=True)
                return
            found = _read(self.path)
            if found is None:
                continue  # released (or moved away by a taker) meanwhile: try again
            raw, inode, age = found
            holder = _parse(raw)
            why = _stale(holder, raw, age)
            if why is None:
                who = (f"another process (pid {holder['pid']} on {holder['host']})" if holder else
                       "another process that is starting right now")
                raise RunBusy(f"{str(self.path.parent)!r} is being trained by {who}; wait for it, or delete "
                              f"{str(self.path)!r} if it is gone",
                              {**(holder or {"pid": None, "host": "?"}), "path": str(self.path)})
            if self._take_over(inode, raw):
                took_over = why
        raise SleepzooError(f"could not lock {str(self.path)!r}: other processes keep taking it")

    def _create(self) -> bool:
        """Create the lock file whole and exclusively; False when one exists."""
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "token": self.token}
        text = json.dumps(record).encode()
        tmp = self.path.with_name(f".{LOCK_NAME}-{self.token}")
        try:
            with open(tmp, "wb") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return False
            except OSError:  # a file system without hard links: create exclusively, then write
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                with os.fdopen(fd, "wb") as f:
                    f.write(text)
            return True
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, inode: int, raw: bytes) -> bool:
        """Remove the stale lock (the file with this inode and content); False if it is gone or replaced, or
        another starter is taking it over right now.

        Takeovers are serialised by a second file created exclusively (``train.lock.takeover``): under it,
        the lock file can not change unless its holder releases it, and a stale lock has no live holder, so
        a file that still has the stale inode and bytes is the stale lock and may be unlinked. A lock file
        is never moved away, so there is no moment without one while a live holder has it. A takeover file
        left by a starter that died inside this method (it is held for microseconds) expires after 10 s."""
        guard = self.path.with_name(f"{LOCK_NAME}.takeover")
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > _TAKEOVER_EXPIRY_S:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.02)
            return False
        try:
            found = _read(self.path)
            if found is None or (found[1], found[0]) != (inode, raw):
                return False  # released, or a fresh lock taken since we looked
            self.path.unlink()
            return True
        finally:
            os.close(fd)
            guard.unlink(missing_ok=True)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        found = _read(self.path)
        if found is not None and (_parse(found[0]) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)
        self._give_up_dir()

    def _give_up_dir(self) -> None:
        if self.created:
            self.created = False
            try:
                self.path.parent.rmdir()  # only when empty: nothing was written (e.g. a refused --resume)
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
