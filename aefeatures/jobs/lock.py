"""One run per feature set at a time: an exclusive lock on `STORE/<name>/.lock`.

The lock is a kernel `flock`, so it is released whenever its holder exits, even by SIGKILL; the
file also records who holds it (pid, host, start time) for the message a second run prints. A
record left by a holder that is gone is a stale lock: it is taken over with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from aefeatures import errors
from aefeatures.store.layout import LOCK

log = logging.getLogger(__name__)

LOCK_FILE = LOCK


@contextmanager
def feature_set_lock(folder: Path) -> Iterator[dict]:
    """Hold the lock of the feature set in ``folder`` for the duration of the block.

    Raises
    ------
    LockHeldError
        Another live process holds it (exit code 4).
    StoreError
        The lock file is a symbolic link: it is never followed (the holder record is written
        and truncated in place, which would change the link's target).
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise errors.linked_store_path(path, os.readlink(path)) from None
        raise
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise errors.LockHeldError(str(path), _read_holder(fd)) from None
        stale = _read_holder(fd)
        if stale:
            log.warning("recovered a stale lock on %s left by pid %s on %s (started %s)",
                        path, stale.get("pid"), stale.get("host"), stale.get("started"))
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        try:
            yield me
        finally:
            os.ftruncate(fd, 0)  # an empty file means "released cleanly"
    finally:
        os.close(fd)  # closing releases the flock


def _read_holder(fd: int) -> dict:
    raw = os.pread(fd, 4096, 0)
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {}
