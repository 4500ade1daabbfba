"""One run per workdir: an advisory `fcntl` lock on `WORKDIR/.lock`, held for the whole run.

The kernel drops the lock when its process dies (kill -9, a lost node on a local disk), so a
crashed run never leaves a lock behind that blocks a restart; the file only says who held it last
(pid, host, time), for the message a second trainer gets. On filesystems without `fcntl` locks
(some NFS setups) the lock is skipped with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from absl import logging

LOCK_NAME = ".lock"


class WorkdirBusyError(RuntimeError):
  """Another run holds the workdir; the message names its pid and host."""


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the lock; `acquire()` raises `WorkdirBusyError`."""

  def __init__(self, workdir: str | Path):
    self.path = Path(workdir) / LOCK_NAME
    self._fd: int | None = None

  def acquire(self) -> WorkdirLock:
    self.path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = _read_holder(fd)
      os.close(fd)
      if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise WorkdirBusyError(
          f"workdir {self.path.parent} is in use by another run ({holder}); wait for it to "
          "finish or use another --workdir"
        ) from None
      logging.warning("Cannot lock %s (%s); not guarding against a second run.", self.path, e)
      return self
    os.ftruncate(fd, 0)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    os.write(fd, json.dumps(record).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read_holder(fd: int) -> str:
  try:
    record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record["since"]))
    return f"pid {record['pid']} on host {record['host']}, since {since}"
  except (OSError, ValueError, KeyError, TypeError):
    return "holder unknown"
