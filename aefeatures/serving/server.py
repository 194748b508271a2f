"""Running the lookup service: the socket, uvicorn, worker processes, signals, and the
connection limits uvicorn lacks (a deadline for a request's headers, a cap on their size, a
cap on open connections that frees the descriptor at once)."""

import asyncio
import functools
import inspect
import json
import logging
import os
import signal
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from aefeatures import errors
from aefeatures.serving.http import ClientGone, Limits, create_app
from aefeatures.serving.live import LiveStore, pointed_versions

SETTINGS_ENV = "AEFEATURES_SERVE_SETTINGS"  # how worker processes learn what to serve
GUARD_ATTR = "aefeatures_connections"  # the Connections a uvicorn Config carries to GuardedHttp (workers too)
FD_RESERVE = 256  # descriptors the automatic cap leaves free: refused connections lingering, then the service's own
LINGER_ROOM = FD_RESERVE // 2  # refused connections closed gracefully (else at once) while this many are over the cap
AUTO_MAX_CONNECTIONS = 4096  # the automatic per-process connection cap never exceeds this
LINGER_SECONDS = 1.0  # a refused connection is closed at the latest this long after its answer
MAX_FD_SOFT = 65536  # the soft open-file limit is raised towards the hard one, at most this far

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Connections:
    """Limits on connections, per worker process.

    ``max_connections``: open connections (and requests in progress) at most; one over it is
    answered 503 and closed at once, so a flood cannot take the descriptors the service needs
    (None: from the open-file limit, see :func:`connection_cap`). ``keep_alive``: seconds an
    idle connection is kept between requests. ``header_timeout``: seconds a client has to send
    a request's headers (from connecting, or from the previous response), else 408 and closed.
    ``max_header_bytes``: a request line and headers larger than this are answered 431 and closed.
    """

    max_connections: int | None = None
    keep_alive: float = 5.0
    header_timeout: float = 10.0
    max_header_bytes: int = 64 * 1024


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits uvicorn has not: a deadline for each
    request's headers (uvicorn waits for them forever: a client that connects and stalls holds
    its descriptor for good), a size cap on them (llhttp has none), and a connection cap that
    refuses at connect time, not once headers are in (which a stalled client never sends).
    The request body's deadline is the app's (:class:`aefeatures.serving.http.BodyLimit`)."""

    _cap_logged = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        limits: Connections = getattr(self.config, GUARD_ATTR, None) or Connections()
        self._header_timeout, self._max_header_bytes = limits.header_timeout, limits.max_header_bytes
        self._max_connections = limits.max_connections
        self._awaiting_headers, self._header_bytes, self._refused = False, 0, False
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if self._max_connections is not None and len(self.connections) > self._max_connections:
            if not GuardedHttp._cap_logged:
                GuardedHttp._cap_logged = True
                log.warning("%d connections open: refusing new ones with 503 until some close (--limit-concurrency; "
                            "logged once)", self._max_connections)
            self._refuse(503, "too_many_connections", "the service has too many open connections; try again shortly.",
                         linger=len(self.connections) <= self._max_connections + LINGER_ROOM)
            return
        self._await_headers()

    def connection_lost(self, exc) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:  # answered already: what else comes is drained, not parsed
            return
        super().data_received(data)
        if self._awaiting_headers and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > self._max_header_bytes:
                self._refuse(431, "headers_too_large",
                             f"request line and headers over {self._max_header_bytes:,} bytes.")

    def on_headers_complete(self) -> None:
        self._stop_waiting()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # a queued request already has its headers
        super().on_response_complete()
        if not pipelined and not self.transport.is_closing():
            self._await_headers()

    def _await_headers(self) -> None:
        self._stop_waiting()
        self._awaiting_headers, self._header_bytes = True, 0
        self._header_deadline = self.loop.call_later(self._header_timeout, self._headers_late)

    def _stop_waiting(self) -> None:
        self._awaiting_headers = False
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_late(self) -> None:
        self._header_deadline = None
        if self._awaiting_headers and not self.transport.is_closing():
            self._refuse(408, "request_timeout", f"no complete request headers within {self._header_timeout:g} s.")

    def _refuse(self, status: int, code: str, message: str, linger: bool = True) -> None:
        """Answer ``status`` with the service's JSON error and close (no request is running).

        With ``linger`` the answer is followed by a FIN, and the connection closed once the
        client closes its side or after :data:`LINGER_SECONDS`: closing at once with the
        client's request unread resets the connection, and the client loses the answer. Without
        (a flood past the cap's lingering room), it is closed at once: the descriptor matters more."""
        self._stop_waiting()
        self._refused = True
        self.transport.write(_refusal(status, code, message))
        if linger and self.transport.can_write_eof():
            self.transport.write_eof()
            self.loop.call_later(LINGER_SECONDS, self.transport.close)
        else:
            self.transport.close()


@functools.lru_cache(maxsize=64)
def _refusal(status: int, code: str, message: str) -> bytes:
    """The whole HTTP answer :meth:`GuardedHttp._refuse` writes (built once: floods repeat it)."""
    body = json.dumps({"error": {"status": status, "code": code, "message": message}}, separators=(",", ":")).encode()
    reason = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}[status]
    return (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, reason, len(body), body))


def open_file_limit(raise_soft: bool = True) -> int | None:
    """This process's soft limit on open files, first raised towards the hard limit (at most
    :data:`MAX_FD_SOFT`) with ``raise_soft``; None where the platform has no such limit."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if raise_soft:
        target = MAX_FD_SOFT if hard == resource.RLIM_INFINITY else min(hard, MAX_FD_SOFT)
        if soft != resource.RLIM_INFINITY and soft < target:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
    return None if soft == resource.RLIM_INFINITY else soft


def connection_cap(requested: int | None, fd_limit: int | None) -> int:
    """Open connections a worker process allows: ``requested`` as given (a warning if the
    open-file limit cannot hold it and :data:`FD_RESERVE` more), else the open-file limit less
    that reserve (at least 16), at most :data:`AUTO_MAX_CONNECTIONS`."""
    if requested is not None:
        if fd_limit is not None and requested > fd_limit - FD_RESERVE:
            log.warning("--limit-concurrency %d is above what the open-file limit %d leaves (%d): a connection flood "
                        "can exhaust the descriptors the service needs to follow LATEST", requested, fd_limit,
                        max(16, fd_limit - FD_RESERVE))
        return requested
    if fd_limit is None:
        return AUTO_MAX_CONNECTIONS
    return max(16, min(AUTO_MAX_CONNECTIONS, fd_limit - FD_RESERVE))


def allowed_host_list(host: str, port: int, extra: Sequence[str] = ()) -> list[str]:
    """The Host header values the service answers: the bound ``host``, localhost, 127.0.0.1 and
    [::1], each with ``port``, then ``extra`` (``NAME`` any port, ``NAME:PORT``, ``*`` anything)."""
    bound = f"[{host}]" if ":" in host and not host.startswith("[") else host
    names = dict.fromkeys([bound.lower(), "localhost", "127.0.0.1", "[::1]"])
    return [f"{name}:{port}" for name in names] + [e.strip().lower() for e in extra if e.strip()]


def app_from_environment() -> FastAPI:
    """App factory for worker processes (``--workers`` > 1): settings come from the parent."""
    settings = json.loads(os.environ[SETTINGS_ENV])
    _search_on_one_thread()
    if settings.get("access_log"):
        _access_log_on()
    open_file_limit()
    live = LiveStore(settings["store"], poll_seconds=settings["poll_seconds"])
    return ClientGone(create_app(live, Limits(**settings["limits"]), allowed_hosts=settings["allowed_hosts"]))


def serve(store_dir: str, *, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          poll_seconds: float = 1.0, limits: Limits = Limits(), connections: Connections = Connections(),
          allowed_hosts: Sequence[str] = (), access_log: bool = False, announce=print) -> None:
    """Serve the store until SIGINT/SIGTERM, then shut down gracefully (in-flight requests
    finish). ``port=0`` picks a free port; ``announce`` gets one line with the address once
    the service accepts requests. ``connections``: limits per worker process;
    ``allowed_hosts``: Host header values answered beyond the defaults (see
    :func:`allowed_host_list`), any other gets 400."""
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
    hosts = allowed_host_list(host, bound_port, allowed_hosts)
    cap = connection_cap(connections.max_connections, open_file_limit())
    connections = Connections(cap, connections.keep_alive, connections.header_timeout, connections.max_header_bytes)
    served = ", ".join(f"{n} {v}" for n, v in versions.items()) or "no feature set yet"
    ready = lambda: announce(f"serving {served} from {store_dir} on http://{bound_host}:{bound_port} "  # noqa: E731
                             f"({workers} worker{'s' * (workers > 1)}); following LATEST")
    # uvicorn's own limit answers 503 once requests in progress reach it (+1: GuardedHttp already
    # caps connections at `cap`, uvicorn counts the connection asking too).
    options = dict(access_log=access_log, log_config=None, timeout_graceful_shutdown=5, server_header=False,
                   http=GuardedHttp, limit_concurrency=cap + 1, timeout_keep_alive=connections.keep_alive,
                   h11_max_incomplete_event_size=connections.max_header_bytes)
    if workers == 1:
        config = uvicorn.Config(ClientGone(create_app(live, limits, allowed_hosts=hosts, on_ready=ready)), **options)
        setattr(config, GUARD_ATTR, connections)
        server = uvicorn.Server(config)
        for sig in (signal.SIGINT, signal.SIGTERM):
            # uvicorn shuts down gracefully, then re-raises the signal into the handler it found:
            # finding this one, the service exits 0 as with several workers.
            signal.signal(sig, lambda *_: None)
        server.run(sockets=[sock])
        return
    os.environ[SETTINGS_ENV] = json.dumps({"store": str(store_dir), "poll_seconds": poll_seconds,
                                           "limits": asdict(limits), "access_log": access_log,
                                           "allowed_hosts": hosts})
    config = uvicorn.Config(f"{__name__}:app_from_environment", factory=True, workers=workers, **options)
    setattr(config, GUARD_ATTR, connections)  # pickled with the config into each worker process
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
