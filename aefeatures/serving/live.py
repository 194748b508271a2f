"""The live version of every feature set in a store, followed as jobs publish (for services).

A :class:`LiveStore` holds one fully loaded :class:`FeatureSet` per name. A background thread
polls each LATEST pointer; when one moves, the new version is loaded whole *beside* the old
one and then swapped in with a single reference assignment. A request takes the feature set
once, at its start, and uses only that object: it can never mix versions, and the old version
stays in memory exactly as long as requests still hold it (Python frees it after the last one).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from aefeatures import errors
from aefeatures.serving.lookup import FeatureSet
from aefeatures.store import layout

log = logging.getLogger(__name__)

PINNED = 4  # versions pinned by id (`?version=`) kept loaded beside the live ones


def pointed_versions(root: Path) -> dict[str, str]:
    """``{name: version}`` the LATEST pointers of the store at ``root`` name (nothing loaded)."""
    if not root.is_dir():
        raise errors.no_store(root)
    return {name: layout.live_version(root, name) for name in layout.feature_sets(root)}


class LiveStore:
    """Every feature set of the store at ``root``, each pinned to its newest loaded version."""

    def __init__(self, root: Path | str, *, poll_seconds: float = 1.0):
        self.root = Path(root)
        pointed_versions(self.root)  # a missing store fails here
        self.poll_seconds = poll_seconds
        self._sets: dict[str, FeatureSet] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pinned: dict[tuple[str, str], FeatureSet] = {}  # versions asked for by id, oldest first
        self._pin_lock = threading.Lock()
        self.refresh()

    def get(self, name: str, version: str | None = None) -> FeatureSet:
        """The current version of ``name``, or ``version`` pinned (loaded whole on first use and
        kept, the :data:`PINNED` most recently loaded); raises :class:`FeatureSetNotFoundError` for an unknown
        name or version, :class:`VersionGoneError` for a version retention deleted."""
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
        """Load the version each LATEST points at where it changed; returns the names switched.

        A version that fails to load (e.g. deleted between reading LATEST and opening it) is
        logged and retried at the next refresh; the previous one keeps serving meanwhile.
        """
        switched = []
        for name in layout.feature_sets(self.root):
            current = self._sets.get(name)
            try:
                version = layout.live_version(self.root, name)
                if current is not None and current.version == version:
                    continue
                loaded = FeatureSet(self.root, name, version).load()
            except Exception as exc:  # noqa: BLE001 — a service must survive a bad publish
                log.warning("could not load feature set %s: %s; still serving %s", name, str(exc).strip().splitlines()[0],
                            current.version if current else "nothing")
                continue
            self._sets = {**self._sets, name: loaded}  # one assignment: readers see old or new
            switched.append(name)
            log.info("serving %s version %s", name, version)
        return switched

    def start(self) -> None:
        """Follow LATEST in a background thread until :meth:`stop`."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._follow, name="aefeatures-live", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _follow(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.refresh()
