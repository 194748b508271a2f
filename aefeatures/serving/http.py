"""The HTTP lookup service: ``aefeatures serve``. JSON in, JSON out; no torch import.

Every answer names the feature set version it came from. A request reads the live feature set
once, at its start (see :mod:`aefeatures.serving.live`), so a publish during the request never mixes
versions. Bad requests get a 4xx JSON error ``{"error": {"status", "code", "message"}}``,
unknown ids a 404; a 5xx means a fault in the service itself.

Single lookups run on the event loop (they take about a millisecond; a thread hop would cost
as much again) when all they need is in memory (:meth:`FeatureSet.is_warm`); batch calls, new
filters and pinned versions still to load (:class:`PinnedVersions`) go to threads, so nothing
stalls the single ones.
"""

import asyncio
import logging
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Any, Callable, Literal, Optional, Sequence, Union

from fastapi import FastAPI, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator
from starlette.exceptions import HTTPException
from starlette.routing import Match

from aefeatures import __version__, errors
from aefeatures.quality import drift
from aefeatures.schema import KEY_METRIC, strict_json
from aefeatures.serving.filters import MAX_FILTER_CHARS
from aefeatures.serving.live import LiveStore, scrub
from aefeatures.serving.lookup import FeatureSet, Neighbours, PinnedVersions, distinct

log = logging.getLogger(__name__)

Id = Union[StrictInt, StrictStr]


def _whole_number(value: Any) -> Any:
    if isinstance(value, (bool, str)):  # JSON true or "10" is not a count; 10.0 is
        raise ValueError("must be a JSON number")
    return value


Count = Annotated[int, BeforeValidator(_whole_number)]
RETRY_AFTER_S = 1  # what a 503 tells a client to wait before asking for a pinned version again


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; beyond it the request is refused with a 4xx."""

    max_k: int = 1000
    max_batch: int = 1000  # ids per batch request
    max_exclude: int = 1000  # ids in an `exclude` list
    max_allow: int = 10_000  # ids in an `items` allow-list
    max_history: int = 10_000  # item ids in one interaction history
    max_body_bytes: int = 1 << 20
    body_timeout: float = 30.0  # seconds to receive a whole request body once its headers are in (else 408)


# --- response shapes (for the OpenAPI description) ---------------------------------------------

class RankedItem(BaseModel):
    rank: int
    item_id: Id
    score: float


class RankedUser(BaseModel):
    rank: int
    user_id: Id
    score: float


class Recommendations(BaseModel):
    feature_set: str
    version: str
    user: Id
    items: list[RankedItem]


class UserItems(BaseModel):
    user: Id
    items: list[RankedItem]


class BatchRecommendations(BaseModel):
    feature_set: str
    version: str
    results: list[UserItems] = Field(description="One entry per distinct known user, in first-seen request order "
                                                 "(42 and \"42\" are one user of an integer-id set).")
    not_found: list[Id] = Field(description="Requested users the version does not know (with skip_unknown).")
    nothing_left: list[Id] = Field(description="Known users with no item left to recommend (they have seen "
                                               "every candidate): their `items` is empty.")


class HistoryItems(BaseModel):
    history: int = Field(description="The history's position in the request (0 for `history`).")
    items: list[RankedItem]
    unknown: list[Id] = Field(description="Item ids of the history this version does not know; left out.")


class HistoryRecommendations(BaseModel):
    feature_set: str
    version: str
    results: list[HistoryItems]


class SimilarItems(BaseModel):
    feature_set: str
    version: str
    item: Id
    items: list[RankedItem]


class SimilarUsers(BaseModel):
    feature_set: str
    version: str
    user: Id
    users: list[RankedUser]


class Embeddings(BaseModel):
    feature_set: str
    version: str
    dim: int
    users: list[dict[str, Any]] | None = None
    items: list[dict[str, Any]] | None = None
    histories: list[dict[str, Any]] | None = None


class ErrorBody(BaseModel):
    status: int
    code: str
    message: str


class Error(BaseModel):
    error: ErrorBody


ERRORS = {code: {"model": Error} for code in (400, 404, 410, 413, 422, 503)}
FILTER_DOC = ("Keep only items whose attributes satisfy this SQL boolean expression over the attribute "
              "columns and item_id, e.g. `category = 'books' AND in_stock AND price < 20` or "
              "`list_contains(tags, 'kids')`. Comparisons, AND/OR/NOT, IN, BETWEEN, LIKE, IS NULL, casts "
              f"and a few functions; at most {MAX_FILTER_CHARS:,} characters. An invalid filter is a 422 "
              "naming the problem.")
ITEMS_DOC = "Keep only these item ids (an allow-list; repeat the parameter); unknown ids are ignored."


def create_app(live: LiveStore, limits: Limits = Limits(), *, follow: bool = True,
               allowed_hosts: Sequence[str] | None = None, on_ready: Callable[[], None] | None = None) -> FastAPI:
    """The ASGI app serving ``live``. With ``follow``, the app polls LATEST while it runs;
    ``allowed_hosts``: the Host header values answered (``NAME:PORT``, ``NAME`` for any port,
    ``*`` for any; None: no check), any other gets 400; ``on_ready`` is called once it has started."""

    History = Annotated[list[Id], Field(max_length=limits.max_history)]
    Weights = Annotated[list[float], Field(max_length=limits.max_history)]

    class BatchRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={
            "oneOf": [{"required": ["users"]}, {"required": ["history"]}, {"required": ["histories"]}]})
        users: list[Id] = Field(None, min_length=1, max_length=limits.max_batch)
        history: History = Field(None, description="Anyone's interaction history (item ids), embedded now by the "
                                                    "version's encoder: no user id, no retraining.")
        histories: list[History] = Field(None, min_length=1, max_length=limits.max_batch,
                                         description="Many histories at once.")
        weights: list[Weights | None] | Weights | None = Field(
            None, description="With `history`: one weight per item (rating, count); with `histories`: one such "
                              "list (or null) per history. Encoded as the job encodes its input.")
        k: Count = Field(10, ge=1, le=limits.max_k)
        exclude_seen: StrictBool = True
        exclude: list[Id] = Field([], max_length=limits.max_exclude)
        skip_unknown: StrictBool = Field(False, description="Leave unknown users out (listed in `not_found`) "
                                                            "instead of answering 404.")
        filter: StrictStr | None = Field(None, max_length=MAX_FILTER_CHARS, description=FILTER_DOC)
        items: list[Id] | None = Field(None, max_length=limits.max_allow, description=ITEMS_DOC)

        @model_validator(mode="after")
        def _one_kind(self):
            if sum(x is not None for x in (self.users, self.history, self.histories)) != 1:
                raise ValueError('send exactly one of "users", "history" or "histories"')
            if self.weights is not None and self.users is not None:
                raise ValueError('"weights" goes with "history" or "histories"')
            if self.skip_unknown and self.users is None:
                raise ValueError('"skip_unknown" goes with "users": a history\'s unknown items are always listed')
            return self

    class HistoryRequest(BaseModel):
        model_config = ConfigDict(extra="forbid")
        history: History
        weights: Weights | None = None
        k: Count = Field(10, ge=1, le=limits.max_k)

    class EmbeddingsRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={
            "oneOf": [{"required": ["users"]}, {"required": ["items"]}, {"required": ["histories"]}]})
        users: list[Id] = Field(None, min_length=1, max_length=limits.max_batch)  # null is not a list
        items: list[Id] = Field(None, min_length=1, max_length=limits.max_batch)
        histories: list[History] = Field(None, min_length=1, max_length=limits.max_batch,
                                         description="Interaction histories (item ids), embedded now.")
        weights: list[Weights | None] | None = None

        @model_validator(mode="after")
        def _one_kind(self):
            if sum(x is not None for x in (self.users, self.items, self.histories)) != 1:
                raise ValueError('send exactly one of "users", "items" or "histories"')
            if self.weights is not None and self.histories is None:
                raise ValueError('"weights" goes with "histories"')
            return self

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if follow:
            live.start()
        if on_ready is not None:
            on_ready()
        try:
            yield
        finally:
            if follow:
                live.stop()

    app = FastAPI(title="aefeatures lookup service", version=__version__, lifespan=lifespan,
                  docs_url=None, redoc_url=None,
                  description="Items for a user, items like an item, users like a user, and embeddings, "
                              "from the live version of each feature set. Every answer names its version.")
    app.state.live, app.state.limits = live, limits
    _install_error_handlers(app)
    # Outermost last: the Host check first, then HEAD as GET, error bodies scrubbed of the store's path.
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes, timeout=limits.body_timeout)
    app.add_middleware(ScrubErrors, root=live.root)
    app.add_middleware(HeadAsGet)
    if allowed_hosts is not None:
        app.add_middleware(HostCheck, allowed=allowed_hosts)

    k_query = Query(10, ge=1, le=limits.max_k, description=f"How many results (at most {limits.max_k}).")
    name_path = Path(description="Feature set name (letters, digits, `_`); any other name is simply not found.")
    version_query = Query(None, alias="version", max_length=64,
                          description="Pin a version (see `aefeatures versions`); default: the live one. "
                                      "404 if it never was published, 410 once retention deleted it.")
    exclude_query = Query([], max_length=limits.max_exclude,
                          description="Item ids to leave out (repeat the parameter); unknown ids are ignored.")
    filter_query = Query(None, max_length=MAX_FILTER_CHARS, description=FILTER_DOC)
    items_query = Query(None, max_length=limits.max_allow, description=ITEMS_DOC)

    @app.get("/healthz", summary="Liveness, and the version served for each feature set",
             responses={503: {"description": "The thread following LATEST is dead"}})
    async def healthz() -> Response:
        report = live.status()
        body = {"status": report["status"], "feature_sets": live.versions()}
        if report["problems"]:
            body["problems"] = report["problems"]
        return _json(body, 503 if report["status"] == "failing" else 200)

    @app.get("/readyz", summary="Readiness: each feature set's version, its age, when LATEST was last read, "
                                "the follower's last error", responses={503: {"description": "Not ready: see "
                                "`problems` (follower dead or stale, a feature set with no servable version)"}})
    async def readyz() -> Response:
        report = live.status()
        return _json(report, 200 if report["ready"] else 503)

    pinned_versions = PinnedVersions(live.root)  # `?version=`: loaded off the event loop, a few kept

    async def serving(name: str, pinned: str | None) -> FeatureSet:
        return await _serving(live, pinned_versions, name, pinned)

    @app.get("/v1/{name}/version", summary="The version being served", responses=ERRORS)
    async def version(name: str = name_path, pinned: Optional[str] = version_query) -> Response:
        fs = await serving(name, pinned)
        m = fs.manifest
        return _json({
            "feature_set": fs.name, "version": fs.version, "created_at": m.get("created_at"),
            "valid_from": m.get("valid_from") or m.get("created_at"), "schema_version": m.get("schema_version", 1),
            "users": m["counts"].get("users"), "items": m["counts"].get("items"), "dim": fs.dim,
            "model": (m.get("config") or {}).get("model", {}).get("kind"), "index": m.get("index"),
            KEY_METRIC: ((m.get("evaluation") or {}).get("model") or {}).get(KEY_METRIC),
            "alignment": drift.public(m.get("alignment")), "drift": m.get("drift"),
            "folded_in": m.get("folded_in"),
        })

    @app.get("/v1/{name}/recommend", response_model=Recommendations, responses=ERRORS,
             summary="Items for a user, without the items they already have")
    async def recommend(name: str = name_path, user: str = Query(..., max_length=256), k: int = k_query,
                        exclude_seen: bool = True, exclude: list[str] = exclude_query,
                        filter: str | None = filter_query, items: list[str] | None = items_query,
                        pinned: Optional[str] = version_query) -> Response:
        fs = await serving(name, pinned)
        call = partial(fs.recommend, user, k, exclude_seen=exclude_seen, exclude=exclude, filter=filter, items=items)
        found = call() if _quick(fs, "recommend", filter, items) else await run_in_threadpool(call)
        return _json(_answer(fs, user=fs.user_id(user), items=_ranked(found, "item_id")))

    @app.post("/v1/{name}/recommend", response_model=Union[BatchRecommendations, HistoryRecommendations],
              responses=ERRORS, summary="Items for many users at once, or for interaction histories")
    async def recommend_batch(body: BatchRequest, name: str = name_path,
                              pinned: Optional[str] = version_query) -> Response:
        fs = await serving(name, pinned)
        if body.history is not None and _quick(fs, "history", body.filter, body.items):  # about a millisecond
            return _histories(fs, body)
        return await run_in_threadpool(_histories if body.users is None else _batch, fs, body)

    @app.get("/v1/{name}/similar", response_model=SimilarItems, responses=ERRORS,
             summary="Items like an item (the item itself left out)")
    async def similar(name: str = name_path, item: str = Query(..., max_length=256), k: int = k_query,
                      metric: Literal["ip", "cosine"] = "ip", exclude: list[str] = exclude_query,
                      filter: str | None = filter_query, items: list[str] | None = items_query,
                      pinned: Optional[str] = version_query) -> Response:
        fs = await serving(name, pinned)
        call = partial(fs.similar_items, item, k, metric=metric, exclude=exclude, filter=filter, items=items)
        found = call() if _quick(fs, "similar" if metric == "ip" else "similar_cosine", filter, items) \
            else await run_in_threadpool(call)
        return _json(_answer(fs, item=fs.item_id(item), items=_ranked(found, "item_id")))

    @app.get("/v1/{name}/similar_users", response_model=SimilarUsers, responses=ERRORS,
             summary="Users like a user, by cosine similarity of their embeddings")
    async def similar_users(name: str = name_path, user: str = Query(..., max_length=256),
                            k: int = k_query, pinned: Optional[str] = version_query) -> Response:
        fs = await serving(name, pinned)
        call = partial(fs.similar_users, user, k)
        found = call() if _quick(fs, "similar_users") else await run_in_threadpool(call)
        return _json(_answer(fs, user=fs.user_id(user), users=_ranked(found, "user_id")))

    @app.post("/v1/{name}/similar_users", response_model=SimilarUsers, responses=ERRORS,
              summary="Users like an interaction history, by cosine similarity of embeddings")
    async def similar_users_history(body: HistoryRequest, name: str = name_path,
                                    pinned: Optional[str] = version_query) -> Response:
        fs = await serving(name, pinned)
        call = partial(fs.similar_users_to_history, body.history, body.k, weights=body.weights)
        found = call() if _quick(fs, "similar_users_history") else await run_in_threadpool(call)
        return _json(_answer(fs, users=_ranked(found, "user_id"), unknown=found.unknown))

    @app.post("/v1/{name}/embeddings", response_model=Embeddings, responses=ERRORS,
              summary="Embeddings of users or of items (one of the two per request)")
    async def embeddings(body: EmbeddingsRequest, name: str = name_path,
                         pinned: Optional[str] = version_query) -> Response:
        fs = await serving(name, pinned)
        if body.histories is not None:
            return await run_in_threadpool(_history_embeddings, fs, body.histories, body.weights)
        return await run_in_threadpool(_embeddings, fs, body.users, body.items)

    @app.get("/v1/{name}/anomalies", responses=ERRORS,
             summary="Users the model explains worst: bots, random clickers, fraud")
    async def anomalies(name: str = name_path, k: int = Query(20, ge=1, le=limits.max_k, description=(
            f"How many users (at most {limits.max_k}); 20 as in the CLI and Python API.")),
                        pinned: Optional[str] = version_query) -> Response:
        fs = await serving(name, pinned)
        return _json(_answer(fs, users=fs.anomalies(k).to_dicts()))

    @app.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        from aefeatures.serving.apidocs import render  # a page without scripts or CDN assets: works offline

        return Response(render(app.openapi()), media_type="text/html; charset=utf-8")

    return app


# --- answers ---------------------------------------------------------------------------------------

async def _serving(live: LiveStore, pinned_versions: PinnedVersions, name: str, pinned: str | None) -> FeatureSet:
    """The version a request reads: the live one of ``name``, or ``pinned`` (``?version=``).
    Nothing is read on the event loop: a pinned version not yet loaded is looked up and loaded
    on a thread (:class:`PinnedVersions`), one at a time; a request for yet another while one
    loads gets a 503 with Retry-After. Raises what :meth:`PinnedVersions.get` raises."""
    fs = live.get(name)
    if pinned is None or pinned == fs.version:
        return fs
    found = pinned_versions.get(name, pinned)
    if found is None:
        raise HTTPException(503, f"the service is loading another pinned version; retry in {RETRY_AFTER_S} s "
                                 "(the live version answers at once).", headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(found, FeatureSet):
        return found
    return await asyncio.shield(asyncio.wrap_future(found))  # a client leaving never cancels a shared load


def _quick(fs: FeatureSet, lookup: str, filter: str | None = None, items: Sequence[Any] | None = None) -> bool:
    """Whether a single lookup stays on the event loop: when it costs about what its search
    costs (about a millisecond). Not when its filter is new to this version (evaluating it may
    take up to the filter time limit) or the version has still to derive what the lookup needs
    (normalised vectors, say): then the thread pool."""
    return fs.is_warm(lookup, filter, items)


def _answer(fs: FeatureSet, **fields: Any) -> dict[str, Any]:
    return {"feature_set": fs.name, "version": fs.version, **fields}


def _ranked(found: Neighbours, key: str) -> list[dict[str, Any]]:
    return [{"rank": n, key: i, "score": s}
            for n, (i, s) in enumerate(zip(found.ids.tolist(), found.scores.tolist()), start=1)]


def _batch(fs: FeatureSet, body) -> Response:
    # One id rule (schema.parse_id): 42 and "42" are one user of an integer-id set, and a
    # user named twice is answered once, in first-seen order.
    users = distinct([fs.user_id(u) for u in body.users])
    recs = fs.recommend_batch(users, body.k, exclude_seen=body.exclude_seen, exclude=body.exclude,
                              skip_unknown=body.skip_unknown, filter=body.filter, items=body.items)
    results: dict[Any, list] = {}
    for user, item, rank, score in zip(*(recs.get_column(c).to_list() for c in ("user_id", "item_id", "rank", "score"))):
        results.setdefault(user, []).append({"rank": rank, "item_id": item, "score": score})
    found = fs.has_users(users).tolist()
    known = [u for u, f in zip(users, found) if f]
    return _json(_answer(fs, results=[{"user": u, "items": results.get(u, [])} for u in known],
                         not_found=[u for u, f in zip(users, found) if not f],
                         nothing_left=[u for u in known if not results.get(u)]))


def _histories(fs: FeatureSet, body) -> Response:
    histories = [body.history] if body.history is not None else body.histories
    weights = body.weights if body.weights is None or body.histories is not None else [body.weights]
    ids, scores, counts, unknown = fs.rank_histories(histories, body.k, weights, body.exclude_seen,
                                                           body.exclude, body.filter, body.items)
    results = [{"history": h, "items": _ranked(Neighbours(ids[h, :n], scores[h, :n]), "item_id"), "unknown": unknown[h]}
               for h, n in enumerate(counts.tolist())]
    return _json(_answer(fs, results=results))


def _history_embeddings(fs: FeatureSet, histories, weights) -> Response:
    vectors, unknown = fs.embed_histories(histories, weights=weights)
    rows = [{"history": h, "embedding": v, "unknown": u} for h, (v, u) in enumerate(zip(vectors.tolist(), unknown))]
    return _json(_answer(fs, dim=fs.dim, histories=rows))


def _embeddings(fs: FeatureSet, users: Sequence[Any] | None, items: Sequence[Any] | None) -> Response:
    kind, raw = ("user", users) if users is not None else ("item", items)
    ids = distinct([fs.user_id(i) for i in raw] if kind == "user" else [fs.item_id(i) for i in raw])
    vectors = fs.user_embeddings(ids) if kind == "user" else fs.item_embeddings(ids)
    rows = [{f"{kind}_id": i, "embedding": v} for i, v in zip(ids, vectors.tolist())]
    return _json(_answer(fs, dim=fs.dim, **{f"{kind}s": rows}))


def _json(body: Any, status: int = 200) -> Response:
    # Encoded here: FastAPI's generic encoder walks every value and costs more than the lookup.
    # Strict JSON (RFC 8259): a NaN or infinite float is written as null.
    return Response(strict_json(body, separators=(",", ":")), status_code=status, media_type="application/json")


# --- errors: always JSON, never a traceback --------------------------------------------------------

def _error(status: int, code: str, message: str) -> Response:
    return _json({"error": {"status": status, "code": code, "message": message}}, status)


def _answer_with(status: int, code: str) -> Callable[[Request, Exception], Any]:
    async def handler(request: Request, exc: Exception) -> Response:
        return _error(status, code, str(exc))

    return handler


def _install_error_handlers(app: FastAPI) -> None:
    # The library's errors as HTTP answers, most specific first (a handler serves its subclasses).
    for error, status, code in ((errors.NotFoundError, 404, "not_found"),
                                (errors.VersionGoneError, 410, "version_gone"),
                                (errors.FilterError, 422, "invalid_filter"),
                                (errors.InvalidIdError, 422, "invalid_id"),
                                # the store's fault, not the request's (a damaged version's files)
                                (errors.DamagedManifestError, 503, "version_damaged"),
                                (errors.BadInputError, 400, "bad_request")):
        app.add_exception_handler(error, _answer_with(status, code))

    async def not_there(request: Request, exc: errors.FeatureSetNotFoundError) -> Response:
        version = getattr(exc, "missing", None) == "version"
        return _error(404, "no_such_version" if version else "no_feature_set", str(exc))

    app.add_exception_handler(errors.FeatureSetNotFoundError, not_there)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> Response:
        problems: dict[str, str] = {}
        for e in exc.errors():
            loc = [str(p) for p in e.get("loc", ())]
            if e.get("type") == "json_invalid":  # loc ends in a character offset, not a field
                problems.setdefault("body", f"not valid JSON ({(e.get('ctx') or {}).get('error', 'malformed')} at "
                                            f"character {loc[-1] if len(loc) > 1 else '?'}); send one JSON object")
                continue
            if loc and loc[-1] in ("int", "str"):  # an id must be one of the two: say so once
                loc, msg = loc[:-1], "an id must be an integer or a string"
            else:
                msg = e.get("msg", "invalid")
            problems.setdefault(_where(loc), msg)
        shown = [f"{where}: {msg}" for where, msg in list(problems.items())[:5]]
        return _error(422, "invalid_request", "; ".join(shown) + ". See /openapi.json for the parameters.")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            # FastAPI's answer when json.loads itself fails (an integer over 4,300 digits,
            # nesting beyond the parser's depth): a malformed body, as any other
            return _error(422, "invalid_request", "body: not JSON this service can read (a number over 4,300 "
                                                  "digits, or nesting too deep); send one JSON object")
        code = {404: "no_such_endpoint", 405: "method_not_allowed", 413: "body_too_large",
                503: "busy"}.get(exc.status_code, "error")
        response = _error(exc.status_code, code, str(exc.detail))
        response.headers.update(exc.headers or {})
        if exc.status_code == 405:  # Allow lists every method of the path, not just one route's
            routes = [r for r in request.app.routes if r.matches(request.scope)[0] != Match.NONE]
            methods = {m for r in routes for m in getattr(r, "methods", ())}
            response.headers["allow"] = ", ".join(sorted(methods | ({"HEAD"} if "GET" in methods else set())))
        return response

    @app.exception_handler(Exception)
    async def fault(request: Request, exc: Exception) -> Response:
        log.exception("fault answering %s %s", request.method, request.url.path)
        return _error(500, "internal_error", "the service failed to answer; the fault is logged.")


def _where(parts: Sequence[str]) -> str:
    if parts and parts[0] in ("query", "path", "body"):
        return f"{parts[0]} `{'.'.join(parts[1:]) or '(whole)'}`"
    return "`" + ".".join(parts) + "`"


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413 before anything parses
    them (by Content-Length when given, else by counting while reading), and bodies not received
    whole within ``timeout`` seconds of the headers with 408 (the connection is closed: a slow
    client cannot hold it open by trickling bytes). Every body is read as JSON whatever its
    Content-Type says: ``curl -d '{...}'`` sends a form content type, and no endpoint takes
    anything but JSON."""

    def __init__(self, app, max_bytes: int, timeout: float = 30.0):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*headers, (b"content-type", b"application/json")]}
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._refuse(send)
        # Only a request announcing a body can make the read wait (a GET's arrives with its headers).
        deadline = (asyncio.get_running_loop().time() + self.timeout
                    if (length not in (None, b"0") or b"transfer-encoding" in headers) else None)
        chunks, size, more = [], 0, True
        while more:
            if deadline is None:
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
                except asyncio.TimeoutError:
                    return await self._too_slow(send)
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)
            chunks.append(message)
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._refuse(send)
        return await self.app(scope, _replay(chunks, receive), send)

    async def _refuse(self, send) -> None:
        response = _error(413, "body_too_large", f"request body over {self.max_bytes:,} bytes; send fewer ids per request.")
        await response({"type": "http"}, None, send)

    async def _too_slow(self, send) -> None:
        response = _error(408, "request_timeout", f"request body not received within {self.timeout:g} s.")
        response.headers["connection"] = "close"  # what is left of the body must not be read as a request
        await response({"type": "http"}, None, send)


class HostCheck:
    """ASGI middleware: answer 400 unless the Host header is one of ``allowed`` (``NAME:PORT``;
    ``NAME`` for any port; ``*`` for any), so a page whose DNS name was rebound to this
    machine's address cannot use the service. A request without Host is refused too."""

    def __init__(self, app, allowed: Sequence[str]):
        self.app, self.any = app, "*" in allowed
        self.exact = {a for a in allowed if a != "*" and _split_host(a)[1] is not None}
        self.names = {a for a in allowed if a != "*" and _split_host(a)[1] is None}
        self.shown = ", ".join(a for a in allowed if a != "*")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.any:
            return await self.app(scope, receive, send)
        found = [v for k, v in scope["headers"] if k == b"host"]
        host = found[0].decode("latin-1").strip().lower() if len(found) == 1 else ""
        if host and (host in self.exact or _split_host(host)[0] in self.names):
            return await self.app(scope, receive, send)
        # RFC 9112: a request with several Host headers is refused (which one a proxy read is unknown)
        shown = f"Host `{host[:100]}`" if host else f"a request with {len(found)} Host headers" if found \
            else "a request without a Host header"
        response = _error(400, "host_not_allowed", f"{shown} is not one this service answers to ({self.shown}); "
                                                   "start it with --allowed-host NAME to add a name.")
        await response(scope, receive, send)


def _split_host(value: str) -> tuple[str, str | None]:
    """``("name", "port")`` of a Host value (``[::1]:8000``, ``example.com``); port None if absent."""
    if value.startswith("["):
        name, _, rest = value.partition("]")
        return name + "]", rest[1:] if rest.startswith(":") else None
    name, colon, port = value.rpartition(":")
    return (name, port) if colon else (value, None)


class HeadAsGet:
    """ASGI middleware: HEAD is answered as GET without the body (status and headers, the
    length included), on every GET endpoint."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message):
            await send({**message, "body": b""} if message["type"] == "http.response.body" else message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class ClientGone:
    """ASGI middleware, outermost: once the client's connection is closed, what is left to send
    is dropped, not raised. A client that pipelines requests and hangs up without reading left
    the queued answers writing to a closed transport (uvloop raises "the handler is closed"),
    and each one logged two tracebacks: a free way to flood the service's log."""

    def __init__(self, app):
        self.app = app

    def __getattr__(self, name):  # the wrapped app's attributes (``state``, routes) stay reachable
        return getattr(self.app, name)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        gone = False

        async def sending(message):
            nonlocal gone
            if gone:
                return
            try:
                await send(message)
            except (RuntimeError, ConnectionError) as exc:
                if isinstance(exc, RuntimeError) and "closed" not in str(exc):
                    raise
                gone = True
                log.debug("client gone before %s %s was answered", scope.get("method"), scope.get("path"))

        await self.app(scope, receive, sending)


class ScrubErrors:
    """ASGI middleware: an error answer (status 400 and up) never shows the store's absolute
    path, whichever handler wrote it: it reads ``STORE`` instead (see :func:`live.scrub`)."""

    def __init__(self, app, root):
        self.app, self.root = app, root

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        held: dict[str, Any] = {}

        async def scrubbing(message):
            if message["type"] == "http.response.start" and message.get("status", 200) >= 400:
                held["start"], held["body"] = message, []
                return
            if "start" not in held or message["type"] != "http.response.body":
                return await send(message)
            held["body"].append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = scrub(b"".join(held["body"]).decode("utf-8", "replace"), self.root).encode()
            start = held.pop("start")
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, scrubbing)


def _replay(messages: list[dict], then=None):
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        return await then() if then is not None else {"type": "http.disconnect"}

    return receive
