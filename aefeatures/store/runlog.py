"""The run history of a feature set: one JSON line per run in `STORE/<name>/runs.jsonl`.

Each line is appended with a single `write` on a file opened for appending, so concurrent
appends (a run and a second run refused by the lock) never interleave within a line.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_LOG = "runs.jsonl"


def append_run(folder: Path, entry: dict[str, Any]) -> None:
    """Append ``entry`` to the run log in ``folder``; a log that cannot be written is a warning,
    never the reason a run fails."""
    line = (json.dumps(entry, default=str, sort_keys=False) + "\n").encode()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a runs.jsonl that is a link fails here rather than appending to its target
        fd = os.open(folder / RUN_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        log.warning("could not append to the run log in %s: %s", folder, exc)


def read_runs(folder: Path) -> list[dict[str, Any]]:
    """Every recorded run, oldest first (a torn last line from a crash is skipped)."""
    path = folder / RUN_LOG
    if not path.is_file():
        return []
    runs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            runs.append(json.loads(line))
        except ValueError:
            continue
    return runs


def published_versions(folder: Path) -> set[str]:
    """Versions some run recorded as published."""
    return {r["version"] for r in read_runs(folder) if r.get("status") == "published" and r.get("version")}
