"""`aefeatures serve`: the HTTP lookup service (see :mod:`aefeatures.serving.http` and :mod:`aefeatures.serving.server`)."""

from __future__ import annotations

from pathlib import Path

import click

from aefeatures.cli.options import READ_EXIT_CODES_HELP, store_option


@click.command(epilog=READ_EXIT_CODES_HELP)
@store_option
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on. The default answers this machine only; 0.0.0.0 opens it to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: a free one).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Processes; they share the memory-mapped indexes. One per core suits CPU-bound lookups.")
@click.option("--poll", "poll_seconds", type=click.FloatRange(min=0.05), default=1.0, show_default=True,
              help="Seconds between checks of each LATEST pointer.")
@click.option("--max-k", type=click.IntRange(min=1), default=1000, show_default=True, help="Largest k a request may ask.")
@click.option("--max-batch", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Most ids in one batch request.")
@click.option("--max-body", "max_body_bytes", type=click.IntRange(min=1), default=1 << 20, show_default=True,
              help="Largest request body in bytes.")
@click.option("--limit-concurrency", "max_connections", type=click.IntRange(min=1), default=None,
              help="Open connections (and requests in progress) per worker; beyond it a connection is answered 503 "
                   "and closed at once.  [default: the open-file limit less 256, at most 4096]")
@click.option("--keep-alive", type=click.FloatRange(min=0.1), default=5.0, show_default=True,
              help="Seconds an idle connection is kept open between requests.")
@click.option("--header-timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds a client has to send a request's headers (from connecting or from the previous answer); "
                   "then 408 and the connection is closed.")
@click.option("--body-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True,
              help="Seconds a client has to send a whole request body after its headers; then 408 and closed.")
@click.option("--max-header-bytes", type=click.IntRange(min=1024), default=64 * 1024, show_default=True,
              help="Largest request line plus headers; beyond it 431 and closed.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME[:PORT]",
              help="A Host header to answer besides the bound address, localhost, 127.0.0.1 and [::1] with the port "
                   "(repeatable; NAME alone: any port; '*': any Host). Others get 400 (DNS rebinding).")
@click.option("--access-log", is_flag=True, help="Log every request (costs throughput).")
def serve(store_dir: Path, host: str, port: int, workers: int, poll_seconds: float, max_k: int, max_batch: int,
          max_body_bytes: int, max_connections: int | None, keep_alive: float, header_timeout: float,
          body_timeout: float, max_header_bytes: int, allowed_hosts: tuple[str, ...], access_log: bool) -> None:
    """Serve lookups over HTTP (JSON) from the live version of every feature set in the store.

    \b
    GET  /v1/NAME/recommend?user=U&k=10          items for a user (exclude=ID repeatable)
    POST /v1/NAME/recommend  {"users": [...], "k": 10}
    GET  /v1/NAME/similar?item=I&k=10&metric=ip   items like an item (or metric=cosine)
    GET  /v1/NAME/similar_users?user=U&k=10
    POST /v1/NAME/embeddings {"users": [...]} or {"items": [...]}
    GET  /v1/NAME/anomalies?k=20    GET /v1/NAME/version    GET /openapi.json
    GET  /healthz (liveness)        GET /readyz (readiness: 503 unless LATEST is followed)

    When a job publishes, the service switches to the new version without a restart; a request
    in flight finishes on the version it started with. Unknown ids answer 404, bad requests 4xx.
    Only requests whose Host names this service are answered (see --allowed-host).
    """
    from aefeatures.serving.http import Limits
    from aefeatures.serving.server import Connections
    from aefeatures.serving.server import serve as run_service

    limits = Limits(max_k=max_k, max_batch=max_batch, max_exclude=max_batch, max_body_bytes=max_body_bytes,
                    body_timeout=body_timeout)
    connections = Connections(max_connections, keep_alive, header_timeout, max_header_bytes)
    run_service(str(store_dir), host=host, port=port, workers=workers, poll_seconds=poll_seconds, limits=limits,
                connections=connections, allowed_hosts=allowed_hosts, access_log=access_log,
                announce=lambda line: click.echo(line, err=True))
