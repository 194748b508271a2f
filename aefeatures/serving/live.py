"""The live version of every feature set in a store, followed as jobs publish (for services).

A :class:`LiveStore` holds one fully loaded :class:`FeatureSet` per name. A background thread
polls each LATEST pointer; when one moves, the new version is loaded whole *beside* the old
one and then swapped in with a single reference assignment. A request takes the feature set
once, at its start, and uses only that object: it can never mix versions, and the old version
stays in memory exactly as long as requests still hold it (Python frees it after the last one).

The follower is supervised: every error is caught, logged once per kind, recorded for
:meth:`LiveStore.status` and retried with backoff; a follower thread that dies anyway is
restarted by the next request or health check. :meth:`LiveStore.status` says what is served,
when each LATEST was last read and what went wrong, so a service can report the truth.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from aefeatures import errors
from aefeatures.serving.lookup import FeatureSet
from aefeatures.store import layout

log = logging.getLogger(__name__)

PINNED = 4  # versions pinned by id (`?version=`) kept loaded beside the live ones
MAX_RETRY_SECONDS = 30.0  # a version that fails to load is retried at most this far apart
STORE_PLACEHOLDER = "STORE"  # what the store's absolute path reads as in anything a client sees


def pointed_versions(root: Path) -> dict[str, str]:
    """``{name: version}`` the LATEST pointers of the store at ``root`` name (nothing loaded)."""
    if not root.is_dir():
        raise errors.no_store(root)
    return {name: layout.live_version(root, name) for name in layout.feature_sets(root)}


def scrub(text: str, root: Path) -> str:
    """``text`` with every absolute spelling of the store directory ``root`` replaced by
    ``STORE``, raw or JSON-escaped: what a client may be shown of a message that names a file."""
    for form in _absolute_forms(root):
        text = text.replace(form, STORE_PLACEHOLDER)
    return text


def _absolute_forms(root: Path) -> list[str]:
    import json

    forms = {str(root.absolute()), str(root.resolve())}
    forms |= {json.dumps(f)[1:-1] for f in forms}  # as it appears inside a JSON string
    return sorted(forms, key=len, reverse=True)  # longest first: a prefix never cuts a longer form


def _iso(wall: float | None) -> str | None:
    return None if wall is None else datetime.fromtimestamp(wall, timezone.utc).isoformat(timespec="milliseconds")


def _age_seconds(stamp: str | None, now: float) -> float | None:
    if not stamp:
        return None
    try:
        moment = datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return round(now - moment.timestamp(), 3)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


@dataclass
class _Followed:
    """What the follower knows of one feature set (times: ``time.time()`` and ``time.monotonic()``)."""

    pointed: str | None = None  # what LATEST named at the last read
    checked_wall: float | None = None  # when LATEST was last read
    checked_mono: float | None = None
    error: str | None = None  # the last check's problem; None once the set serves what LATEST names
    last_error: tuple[float, str] | None = None  # the latest problem ever seen, and when
    failed_version: str | None = None  # a version that failed to load ...
    retry_at: float = 0.0  # ... is tried again from then (monotonic) ...
    retry_delay: float = 0.0  # ... and the delay doubles while it keeps failing


class LiveStore:
    """Every feature set of the store at ``root``, each pinned to its newest loaded version.

    ``poll_seconds``: how often the follower reads each LATEST. ``stale_seconds``: how long the
    store may go unchecked before :meth:`status` calls the service not ready (default: the
    larger of 10 polls and 30 s).
    """

    def __init__(self, root: Path | str, *, poll_seconds: float = 1.0, stale_seconds: float | None = None):
        self.root = Path(root)
        pointed_versions(self.root)  # a missing store fails here
        self.poll_seconds = poll_seconds
        self.stale_seconds = stale_seconds if stale_seconds is not None else max(10 * poll_seconds, 30.0)
        self._sets: dict[str, FeatureSet] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pinned: dict[tuple[str, str], FeatureSet] = {}  # versions asked for by id, oldest first
        self._pin_lock = threading.Lock()
        self._check_lock = threading.Lock()  # one check of the store at a time
        self._state_lock = threading.Lock()  # what status() reads
        self._followed: dict[str, _Followed] = {}
        self._store_checked: tuple[float, float] | None = None  # (wall, monotonic) of the last listing of the store
        self._store_error: str | None = None  # the last listing's problem
        self._last_error: tuple[float, str] | None = None  # the follower's latest problem ever
        self._failures = 0  # store checks failed in a row
        self._logged: set[str] = set()  # kinds of problem already logged (once each until they clear)
        self._following = False
        self._restarts = 0
        self._death: str | None = None  # why the follower thread last ended, if it died
        self._next_revival = 0.0
        self.refresh()

    def get(self, name: str, version: str | None = None) -> FeatureSet:
        """The current version of ``name``, or ``version`` pinned (loaded whole on first use and
        kept, the :data:`PINNED` most recently loaded); raises :class:`FeatureSetNotFoundError` for an unknown
        name or version, :class:`VersionGoneError` for a version retention deleted."""
        thread = self._thread
        if thread is not None and not thread.is_alive():
            self._revive(thread)
        try:
            current = self._sets[name]
        except KeyError:
            raise errors.not_served(name, sorted(self._sets)) from None
        if version is None or version == current.version:
            return current
        with self._pin_lock:
            pinned = self._pinned.get((name, version))
            if pinned is None:
                pinned = FeatureSet(self.root, name, version).load()
                self._pinned[(name, version)] = pinned
                while len(self._pinned) > PINNED:
                    self._pinned.pop(next(iter(self._pinned)))
            return pinned

    def versions(self) -> dict[str, str]:
        """``{name: version}`` of what is being served now."""
        return {name: fs.version for name, fs in sorted(self._sets.items())}

    def refresh(self) -> list[str]:
        """Check the store now: load the version each LATEST points at where it changed; returns
        the names switched. Never raises.

        A version that fails to load (e.g. deleted between reading LATEST and opening it) is
        logged and retried (by the follower with backoff, by this call at once); the previous
        one keeps serving meanwhile. A store or LATEST that cannot be read is logged and recorded
        for :meth:`status` the same way.
        """
        return self._check(backoff=False)

    # --- following ----------------------------------------------------------------------------

    def start(self) -> None:
        """Follow LATEST in a background thread until :meth:`stop` (restarted if it ever dies)."""
        self._following = True
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._follow, name="aefeatures-live", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop following; returns once the follower thread has ended."""
        self._following = False
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _follow(self) -> None:
        delay = self.poll_seconds
        try:
            while not self._stop.wait(delay):
                try:
                    self._check(backoff=True)
                    delay = self.poll_seconds if self._store_error is None else self._store_backoff()
                except Exception as exc:  # noqa: BLE001 — a fault in the check itself: record, back off, go on
                    with self._state_lock:
                        self._failures += 1
                    self._problem("follower", "the LATEST follower failed", exc)
                    delay = self._store_backoff()
        except BaseException as exc:  # it dies (SystemExit, an interpreter fault): say why; a request revives it
            self._death = _first_line(exc)
            raise

    def _store_backoff(self) -> float:
        return min(self.poll_seconds * 2 ** min(self._failures, 16), max(self.poll_seconds, 5.0))

    def _revive(self, dead: threading.Thread) -> None:
        """Restart a follower thread that died (at most once per poll interval)."""
        with self._state_lock:
            if self._thread is not dead or self._stop.is_set() or time.monotonic() < self._next_revival:
                return
            self._next_revival = time.monotonic() + self.poll_seconds
            self._restarts += 1
            why = self._death or "no error recorded"
            self._last_error = (time.time(), f"the LATEST follower thread died ({why}); restarted")
        log.error("the thread following LATEST died (%s); restarting it", why)
        self.start()

    # --- one check of the store ---------------------------------------------------------------

    def _check(self, backoff: bool) -> list[str]:
        with self._check_lock:
            try:
                names = layout.feature_sets(self.root)
                if not self.root.is_dir():
                    raise errors.no_store(self.root)
            except Exception as exc:  # noqa: BLE001 — e.g. out of file descriptors during a connection flood
                with self._state_lock:
                    self._failures += 1
                    self._store_error = self._public(f"cannot list the store: {_first_line(exc)}")
                self._problem("store", "could not check the store", exc)
                return []
            with self._state_lock:
                self._failures, self._store_error = 0, None
                self._store_checked = (time.time(), time.monotonic())
            self._cleared("store", "the store can be checked again")
            self._cleared("follower", "the LATEST follower works again")
            self._drop_removed(set(names))
            switched = []
            for name in sorted(set(names) | set(self._sets)):
                if self._check_one(name, backoff):
                    switched.append(name)
            return switched

    def _drop_removed(self, listed: set[str]) -> None:
        """Stop serving a feature set whose folder left the store (deleted or renamed): it is no
        longer anyone's to serve, and would otherwise be reported stale for ever."""
        gone = [name for name in self._sets if name not in listed and not (self.root / name).exists()]
        gone += [name for name in self._followed if name not in self._sets and name not in listed
                 and not (self.root / name).exists()]
        if not gone:
            return
        self._sets = {name: fs for name, fs in self._sets.items() if name not in gone}
        with self._state_lock:
            for name in gone:
                self._followed.pop(name, None)
        for name in sorted(set(gone)):
            self._cleared(f"set:{name}", f"feature set {name}: its folder left the store; no longer served")
            log.warning("feature set %s: its folder left the store; no longer served", name)

    def _check_one(self, name: str, backoff: bool) -> bool:
        with self._state_lock:  # status() iterates the dict
            followed = self._followed.setdefault(name, _Followed())
        current = self._sets.get(name)
        serving = current.version if current else "nothing"
        try:
            version = layout.live_version(self.root, name)
        except Exception as exc:  # noqa: BLE001 — LATEST missing, unreadable, a directory...
            self._set_problem(name, f"cannot read its LATEST ({_first_line(exc)}); still serving {serving}", exc)
            return False
        with self._state_lock:
            followed.pointed = version
            followed.checked_wall, followed.checked_mono = time.time(), time.monotonic()
        if current is not None and current.version == version:
            self._set_cleared(name)
            return False
        if backoff and followed.failed_version == version and time.monotonic() < followed.retry_at:
            return False
        try:
            loaded = FeatureSet(self.root, name, version).load()
        except Exception as exc:  # noqa: BLE001 — a service must survive a bad publish
            followed.retry_delay = min(max(self.poll_seconds, 2 * followed.retry_delay), MAX_RETRY_SECONDS)
            followed.failed_version, followed.retry_at = version, time.monotonic() + followed.retry_delay
            self._set_problem(name, f"could not load feature set {name} version {version} "
                                    f"({_first_line(exc)}); still serving {serving}", exc)
            return False
        followed.failed_version, followed.retry_delay = None, 0.0
        self._sets = {**self._sets, name: loaded}  # one assignment: readers see old or new
        log.info("serving %s version %s", name, version)
        self._set_cleared(name)
        return True

    # --- problems: recorded for status(), logged once per kind --------------------------------

    def _public(self, text: str) -> str:
        return scrub(text, self.root)

    def _problem(self, kind: str, what: str, exc: BaseException) -> None:
        message = self._public(f"{what}: {_first_line(exc)}")
        with self._state_lock:
            self._last_error = (time.time(), message)
        key = f"{kind}:{type(exc).__name__}"
        if key not in self._logged:
            self._logged.add(key)
            log.warning("%s: %s (retrying with backoff; logged once until it clears)", what, _first_line(exc))

    def _cleared(self, kind: str, what: str) -> None:
        gone = {k for k in self._logged if k.startswith(kind + ":")}
        if gone:
            self._logged -= gone
            log.warning(what)  # at the level the problem was logged, so the log shows it cleared

    def _set_problem(self, name: str, message: str, exc: BaseException) -> None:
        with self._state_lock:
            followed = self._followed[name]
            followed.error = self._public(message)
            followed.last_error = self._last_error = (time.time(), followed.error)
        key = f"set:{name}:{type(exc).__name__}"
        if key not in self._logged:
            self._logged.add(key)
            log.warning("feature set %s: %s (retrying with backoff; logged once until it clears)", name, message)

    def _set_cleared(self, name: str) -> None:
        with self._state_lock:
            self._followed[name].error = None
        self._cleared(f"set:{name}", f"feature set {name}: following its LATEST again")

    # --- what a health check reports ----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The truth about what is served and followed, for health checks (JSON-ready; times are
        ISO 8601 UTC, durations seconds; no absolute store path anywhere):

        ``{"ready": bool, "status": "ok" | "degraded" | "failing", "problems": [str, ...],
        "follower": {"following", "alive", "poll_seconds", "stale_after_seconds", "last_check",
        "seconds_since_check", "restarts", "error", "last_error": {"at", "message"} | None},
        "feature_sets": {name: {"version", "valid_from", "age_seconds", "latest", "checked_at",
        "seconds_since_check", "error", "last_error"}}}``

        Not ready when the follower is not running, the store or a LATEST has not been read for
        ``stale_seconds``, or a feature set has no servable version. ``status`` is "failing" when
        the follower thread is dead (it is restarted here, at most once per poll interval),
        "degraded" when anything else is wrong or not ready.
        """
        thread = self._thread
        if thread is not None and not thread.is_alive():
            self._revive(thread)
        thread = self._thread
        alive = thread is not None and thread.is_alive()
        now_wall, now_mono = time.time(), time.monotonic()
        not_ready: list[str] = []  # what makes the service not ready
        troubles: list[str] = []  # what is wrong but still serves
        stale = self.stale_seconds
        with self._state_lock:
            sets = dict(self._sets)
            checked = self._store_checked
            since = None if checked is None else round(now_mono - checked[1], 3)
            if not self._following:
                not_ready.append("not following LATEST (the follower was not started)")
            elif not alive:
                not_ready.append(f"the LATEST follower thread is dead ({self._death or 'no error recorded'})")
            if since is None or since > stale:
                not_ready.append(f"the store has not been checked for over {stale:g} s" +
                                 (f": {self._store_error}" if self._store_error else ""))
            elif self._store_error:
                troubles.append(self._store_error)
            follower = {"following": self._following, "alive": alive, "poll_seconds": self.poll_seconds,
                        "stale_after_seconds": stale, "last_check": _iso(checked and checked[0]),
                        "seconds_since_check": since, "restarts": self._restarts, "error": self._store_error,
                        "last_error": _error_json(self._last_error)}
            report = {}
            for name in sorted(set(self._followed) | set(sets)):
                followed = self._followed.get(name, _Followed())
                fs = sets.get(name)
                valid_from = None
                if fs is not None:
                    manifest = fs.manifest
                    valid_from = manifest.get("valid_from") or manifest.get("created_at")
                set_since = None if followed.checked_mono is None else round(now_mono - followed.checked_mono, 3)
                detail = f": {followed.error}" if followed.error else ""
                if fs is None:
                    not_ready.append(f"feature set {name} has no servable version{detail}")
                elif set_since is None or set_since > stale:
                    not_ready.append(f"feature set {name}: LATEST not read for over {stale:g} s{detail}")
                elif followed.error:
                    troubles.append(f"feature set {name}{detail}")
                report[name] = {"version": fs.version if fs else None, "valid_from": valid_from,
                                "age_seconds": _age_seconds(valid_from, now_wall), "latest": followed.pointed,
                                "checked_at": _iso(followed.checked_wall), "seconds_since_check": set_since,
                                "error": followed.error, "last_error": _error_json(followed.last_error)}
        problems = not_ready + troubles
        ready = not not_ready
        status = "failing" if self._following and not alive else ("ok" if not problems else "degraded")
        return {"ready": ready, "status": status, "problems": problems, "follower": follower, "feature_sets": report}


def _error_json(error: tuple[float, str] | None) -> dict[str, str] | None:
    return None if error is None else {"at": _iso(error[0]), "message": error[1]}
