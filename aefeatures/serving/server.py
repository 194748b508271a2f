"""Running the lookup service: the socket, uvicorn, worker processes, signals."""

import inspect
import json
import logging
import os
import signal
import socket
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI

from aefeatures import errors
from aefeatures.serving.http import Limits, create_app
from aefeatures.serving.live import LiveStore, pointed_versions

SETTINGS_ENV = "AEFEATURES_SERVE_SETTINGS"  # how worker processes learn what to serve


def app_from_environment() -> FastAPI:
    """App factory for worker processes (``--workers`` > 1): settings come from the parent."""
    settings = json.loads(os.environ[SETTINGS_ENV])
    _search_on_one_thread()
    if settings.get("access_log"):
        _access_log_on()
    live = LiveStore(settings["store"], poll_seconds=settings["poll_seconds"])
    return create_app(live, Limits(**settings["limits"]))


def serve(store_dir: str, *, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          poll_seconds: float = 1.0, limits: Limits = Limits(), access_log: bool = False,
          announce=print) -> None:
    """Serve the store until SIGINT/SIGTERM, then shut down gracefully (in-flight requests
    finish). ``port=0`` picks a free port; ``announce`` gets one line with the address once
    the service accepts requests."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    # A missing store fails here, not per request. With several workers each loads the store
    # itself; the parent only supervises and loads nothing.
    live = LiveStore(store_dir, poll_seconds=poll_seconds) if workers == 1 else None
    versions = live.versions() if live else pointed_versions(Path(store_dir))
    _search_on_one_thread()
    if access_log:
        _access_log_on()
    sock = _bind(host, port)
    bound_host, bound_port = sock.getsockname()[:2]
    served = ", ".join(f"{n} {v}" for n, v in versions.items()) or "no feature set yet"
    ready = lambda: announce(f"serving {served} from {store_dir} on http://{bound_host}:{bound_port} "  # noqa: E731
                             f"({workers} worker{'s' * (workers > 1)}); following LATEST")
    options = dict(access_log=access_log, log_config=None, timeout_graceful_shutdown=5, server_header=False)
    if workers == 1:
        server = uvicorn.Server(uvicorn.Config(create_app(live, limits, on_ready=ready), **options))
        for sig in (signal.SIGINT, signal.SIGTERM):
            # uvicorn shuts down gracefully, then re-raises the signal into the handler it found:
            # finding this one, the service exits 0 as with several workers.
            signal.signal(sig, lambda *_: None)
        server.run(sockets=[sock])
        return
    os.environ[SETTINGS_ENV] = json.dumps({"store": str(store_dir), "poll_seconds": poll_seconds,
                                           "limits": asdict(limits), "access_log": access_log})
    config = uvicorn.Config(f"{__name__}:app_from_environment", factory=True, workers=workers, **options)
    ready()
    if "target" in inspect.signature(Multiprocess).parameters:  # uvicorn before 0.31
        Multiprocess(config, target=uvicorn.Server(config).run, sockets=[sock]).run()
    else:
        Multiprocess(config, sockets=[sock]).run()


def _access_log_on() -> None:
    """Let uvicorn's access lines (INFO) through whatever level the rest of the logging has,
    with a stderr handler when the process has none (worker processes)."""
    access = logging.getLogger("uvicorn.access")
    access.setLevel(logging.INFO)
    if not logging.getLogger().handlers and not access.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        access.addHandler(handler)


def _search_on_one_thread() -> None:
    """One FAISS thread per search: a service's parallelism is its concurrent requests (and
    workers); OpenMP threads splitting a single query contend with them, and on a busy
    machine one query then waits for scheduler slices (measured: 60× slower on 2 cores)."""
    import faiss

    faiss.omp_set_num_threads(1)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise errors.cannot_listen(host, port, exc.strerror) from None
    sock.listen(2048)  # connections queue from now on, even before the first accept
    sock.set_inheritable(True)
    return sock
