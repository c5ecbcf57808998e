"""`retrodb serve`: one warm, read-only process for neighbour debugging (a JSON API and a web page).

A cold `retrodb query` imports torch and loads the embedder before a search that takes under a
millisecond. `Service` keeps one `Database` handle for as long as it runs: its query cache holds the
embedder, the loaded HNSW indexes and the Parquet metadata, so a query costs its embedding and its
search. It follows commits: every request first reads `CURRENT` (one small file) and, when another
process has committed, moves the handle to the new snapshot (files the new snapshot still references
stay cached). A snapshot that `vacuum` removed while a request was reading it is never served: the
request is retried once on the current snapshot.

The service never writes to the database (no lock, no file written), so any number of writers may work
beside it. All database access goes through one lock: queries are short, and the searcher and the
embedder are not meant to be shared by threads.

When the RETRO model fits the database (the bundled one does for a database built with the default
tokenizer; `--model DIR` for another), the service also holds it: `/api/generate` continues a prompt,
retrieving for each completed chunk, and `/api/eval` gives bits per byte with and without retrieval.
Both read the database as it is at the request, like queries.

`create_app(service)` is a Starlette application; `serve()` runs it under uvicorn.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from . import snapshot as snap
from .database import Database
from .errors import DatabaseNotFound, RetrodbError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8750
MAX_BODY = 1 << 20  # bytes of a request body
MAX_QUERIES = 256  # texts or chunk ids per request
MAX_K = 1000
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class BadRequest(RetrodbError):
    """A request the API refuses (HTTP 400): wrong types, missing fields, too large."""


class NotFound(RetrodbError):
    """A document or chunk that is not in the current snapshot (HTTP 404)."""


@dataclass
class QueryRequest:
    """One query call, validated: exactly one of `texts` and `chunk_ids`."""

    texts: list[str] | None = None
    chunk_ids: list[int] | None = None
    k: int = 4
    ef: int = 64
    exact: bool = False
    exclude_doc: list[str] | None = None
    exclude_same_doc: bool = True

    @classmethod
    def from_json(cls, body: Any) -> "QueryRequest":
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object",
                             hint='{"texts": ["how do generators work"], "k": 4}')
        unknown = set(body) - {"text", "texts", "chunk_id", "chunk_ids", "k", "ef", "exact", "exclude_doc",
                               "exclude_same_doc"}
        if unknown:
            raise BadRequest(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}",
                             hint="fields: texts (or text), chunk_ids (or chunk_id), k, ef, exact, exclude_doc, "
                                  "exclude_same_doc")
        texts = _list_of(body, "text", "texts", str)
        chunk_ids = _list_of(body, "chunk_id", "chunk_ids", int)
        if (texts is None) == (chunk_ids is None):
            raise BadRequest("give exactly one of texts (or text) and chunk_ids (or chunk_id)")
        if len(texts or chunk_ids) > MAX_QUERIES:
            raise BadRequest(f"at most {MAX_QUERIES} queries per request")
        exclude = _list_of(body, "exclude_doc", "exclude_doc", str)
        return cls(texts=texts, chunk_ids=chunk_ids, k=_int(body, "k", 4, 1, MAX_K), ef=_int(body, "ef", 64, 1, 100_000),
                   exact=_bool(body, "exact", False), exclude_doc=exclude,
                   exclude_same_doc=_bool(body, "exclude_same_doc", True))


def _list_of(body: dict, one: str, many: str, kind: type) -> list | None:
    if one in body and many in body and one != many:
        raise BadRequest(f"give {one} or {many}, not both")
    if one in body and one != many:
        value = [body[one]]
        name = one
    elif many in body:
        value = body[many]
        name = many
        if not isinstance(value, list):
            raise BadRequest(f"{name} must be a list")
    else:
        return None
    for v in value:
        if not isinstance(v, kind) or isinstance(v, bool):
            raise BadRequest(f"{name} must hold {'strings' if kind is str else 'integers'}, not {type(v).__name__}")
    return value


def _int(body: dict, name: str, default: int, lo: int, hi: int) -> int:
    v = body.get(name, default)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise BadRequest(f"{name} must be an integer from {lo} to {hi}")
    return v


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, default)
    if not isinstance(v, bool):
        raise BadRequest(f"{name} must be true or false")
    return v


@dataclass
class GenerateRequest:
    prompt: str
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    seed: int = 0
    retrieval: bool = True
    k: int = 2

    @classmethod
    def from_json(cls, body: Any) -> "GenerateRequest":
        _fields(body, {"prompt", "max_new_tokens", "temperature", "top_p", "seed", "retrieval", "k"},
                '{"prompt": "def fibonacci(n):", "max_new_tokens": 64}')
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest("prompt must be a non-empty string")
        return cls(prompt=prompt, max_new_tokens=_int(body, "max_new_tokens", 64, 1, 1024),
                   temperature=_float(body, "temperature", 0.8, 0.0, 10.0), top_p=_float(body, "top_p", 0.95, 1e-6, 1.0),
                   seed=_int(body, "seed", 0, 0, 2**63 - 1), retrieval=_bool(body, "retrieval", True),
                   k=_int(body, "k", 2, 1, 16))


@dataclass
class EvalRequest:
    texts: list[str]
    k: int = 2
    exclude_doc: list[str] | None = None

    @classmethod
    def from_json(cls, body: Any) -> "EvalRequest":
        _fields(body, {"text", "texts", "k", "exclude_doc"}, '{"texts": ["some text to score"], "k": 2}')
        texts = _list_of(body, "text", "texts", str)
        if not texts or not all(t.strip() for t in texts):
            raise BadRequest("give texts (or text): non-empty strings")
        if len(texts) > MAX_QUERIES:
            raise BadRequest(f"at most {MAX_QUERIES} texts per request")
        return cls(texts=texts, k=_int(body, "k", 2, 1, 16), exclude_doc=_list_of(body, "exclude_doc", "exclude_doc", str))


def _fields(body: Any, known: set[str], example: str) -> None:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object", hint=example)
    unknown = set(body) - known
    if unknown:
        raise BadRequest(f"unknown field(s): {', '.join(sorted(map(str, unknown)))}",
                         hint="fields: " + ", ".join(sorted(known)))


def _float(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name, default)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
        raise BadRequest(f"{name} must be a number from {lo} to {hi}")
    return float(v)


class Service:
    """The warm state of `retrodb serve`: one database handle that follows commits, never writes."""

    def __init__(self, root: str | Path, *, device: str = "auto", threads: int | None = None,
                 model: str | Path | None = None, with_model: bool = True):
        self.root = Path(root)
        if not (self.root / snap.CURRENT).exists():
            raise DatabaseNotFound(f"no retrodb database at {self.root}",
                                   hint="give the directory of an existing database (see: retrodb ingest --help)")
        self.db = Database(self.root)
        self.device = device
        self.threads = threads
        self.started = time.time()
        self._lock = threading.RLock()
        self.lm = None
        self.model_note: str | None = None  # why there is no model, when there is none
        if with_model or model is not None:
            self._load_model(model)

    def _load_model(self, model: str | Path | None) -> None:
        """The RETRO model for generate and eval: `model`, else the bundled one if it fits this database.
        A model asked for by name must fit; the bundled one that does not is left out, and health says why."""
        from .model.lm import load

        try:
            lm = load(model, device=self.device)
            lm.check_database(self.db)
        except RetrodbError as exc:
            if model is not None:
                raise
            self.model_note = exc.message
            return
        self.lm = lm

    # ------------------------------------------------------------ snapshot

    def refresh(self) -> Database:
        """Move the handle to the current snapshot if another process committed since the last request."""
        version = snap.current_version(self.root)
        if version != self.db.version:
            self.db.snapshot = snap.read_manifest(self.root, version)
        return self.db

    def _run(self, fn: Callable[[Database], Any]) -> Any:
        """Run `fn` on the current snapshot; once more on a newer one if the snapshot was vacuumed meanwhile."""
        with self._lock:
            db = self.refresh()
            try:
                return fn(db)
            except (DatabaseNotFound, FileNotFoundError):
                if snap.current_version(self.root) == db.version and _files_present(db):
                    raise
                return fn(self.refresh())

    # ------------------------------------------------------------ API

    def query(self, req: QueryRequest) -> dict:
        started = time.perf_counter()
        warnings: list[str] = []

        def go(db: Database) -> dict:
            results = db.query(req.texts, req.k, ef=req.ef, exact=req.exact, exclude_doc=req.exclude_doc,
                               chunk_ids=req.chunk_ids, exclude_same_doc=req.exclude_same_doc,
                               threads=self.threads, device=self.device, on_warning=warnings.append,
                               overlap=True)
            return {"path": str(self.root.resolve()), "version": db.version,
                    "results": [result_json(r) for r in results]}

        out = self._run(go)
        out["warnings"] = warnings
        out["seconds"] = round(time.perf_counter() - started, 6)
        return out

    def stats(self) -> dict:
        return self._run(lambda db: db.stats())

    def health(self) -> dict:
        return self._run(lambda db: {"ok": True, "version": db.version, "path": str(self.root.resolve()),
                                     "embedder": (db.config.get("embedder") or {}).get("path"),
                                     "model": self.lm.describe() if self.lm else None,
                                     "model_note": self.model_note,
                                     "uptime_s": round(time.time() - self.started, 1)})

    def _model(self):
        if self.lm is None:
            raise NotFound("this server has no RETRO model" + (f": {self.model_note}" if self.model_note else ""),
                           hint="start it with --model DIR (a model trained on this database's tokenizer)")
        return self.lm

    def generate(self, req: GenerateRequest) -> dict:
        """Continue a prompt, retrieving for each completed chunk from the current snapshot."""
        lm = self._model()
        started = time.perf_counter()

        def go(db: Database) -> dict:
            g = lm.generate(db if req.retrieval else None, req.prompt, max_new_tokens=req.max_new_tokens,
                            temperature=req.temperature, top_p=req.top_p, seed=req.seed, retrieval=req.retrieval,
                            k=req.k)
            prompt_tokens = len(lm.tokenizer.encode(req.prompt, add_special_tokens=False).ids)
            return {"version": db.version, **g.to_dict(with_text=True), "prompt_tokens": prompt_tokens,
                    "chunk_size": lm.chunk_size}

        out = self._run(go)
        out["seconds"] = round(time.perf_counter() - started, 6)
        return out

    def eval(self, req: EvalRequest) -> dict:
        """Bits per byte of texts with retrieval from the current snapshot and without (`retrodb eval`)."""
        lm = self._model()
        started = time.perf_counter()

        def go(db: Database) -> dict:
            report = lm.bpb(db, req.texts, k=req.k, exclude_doc=req.exclude_doc)
            return {"version": db.version, **report.to_dict()}

        out = self._run(go)
        out["seconds"] = round(time.perf_counter() - started, 6)
        return out

    def warm(self) -> None:
        """Load the embedder and every index now, so that the first request is as fast as the rest."""
        from .errors import MissingStage

        try:
            self.query(QueryRequest(texts=["warm up"], k=1))
        except MissingStage:
            pass  # nothing searchable yet: requests will say so

    def document(self, doc_id: str) -> dict:
        """A live document: its text and its chunks (id, position, character span)."""
        return self._run(lambda db: _document(db, doc_id, self.threads, self.device))


def result_json(r) -> dict:
    """The JSON form of a `QueryResult`, as `retrodb query --format json` prints it, plus the chunk asked about."""
    d = r.to_dict()
    if r.chunk_id is not None:
        d["chunk_id"] = r.chunk_id
    return d


def _files_present(db: Database) -> bool:
    return all(db.snapshot.path(rec).exists() for rec in db.snapshot.files())


def _document(db: Database, doc_id: str, threads, device) -> dict:
    from .query import searcher_for

    from .ids import lookup

    searcher = searcher_for(db, threads=threads, device=device)
    live, _ = lookup(db.snapshot, [doc_id])  # the id index: only the segment that holds it is read
    for loc in live:
        seg = searcher.reader(loc.segment)
        lo, hi = loc.first_chunk_id, loc.first_chunk_id + loc.num_chunks
        _, text = seg.doc_texts([lo])[lo]
        rows = seg.chunk_rows(range(lo, hi))
        chunks = [{"chunk_id": cid, "position": rows[cid]["position"], "char_start": rows[cid]["char_start"],
                   "char_end": rows[cid]["char_end"]} for cid in sorted(rows)]
        return {"doc_id": doc_id, "segment": seg.name, "version": db.version, "text": text, "chunks": chunks}
    raise NotFound(f"no live document {doc_id!r} in v{db.version} of {db.root}",
                   hint="document ids are listed by: retrodb sql DB \"SELECT doc_id FROM documents\"")


# ---------------------------------------------------------------- HTTP


def page_html() -> str:
    """The single-page neighbour debugger (no build step: one HTML file with its script and style)."""
    return resources.files("retrodb").joinpath("web/index.html").read_text(encoding="utf-8")


def create_app(service: Service):
    """The Starlette application: the page at /, the JSON API under /api/."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    def error(exc: Exception) -> JSONResponse:
        if isinstance(exc, BadRequest):
            status = 400
        elif isinstance(exc, (NotFound, DatabaseNotFound)):
            status = 404
        elif isinstance(exc, RetrodbError):
            status = 400
        else:
            return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}",
                                 "hint": "see the server's log, and please report it"}, status_code=500)
        return JSONResponse({"error": exc.message, "hint": exc.hint}, status_code=status)

    async def call(fn, *args) -> JSONResponse:
        try:
            return JSONResponse(await run_in_threadpool(fn, *args))
        except Exception as exc:  # every error becomes JSON with the CLI's message
            return error(exc)

    async def body_of(request: Request) -> Any:
        import json

        if int(request.headers.get("content-length") or 0) > MAX_BODY:
            raise BadRequest(f"request body over {MAX_BODY} bytes")
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > MAX_BODY:
                raise BadRequest(f"request body over {MAX_BODY} bytes")
        try:
            return json.loads(raw or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest(f"the request body is not JSON: {exc}") from None

    async def query(request: Request) -> JSONResponse:
        try:
            req = QueryRequest.from_json(await body_of(request))
        except BadRequest as exc:
            return error(exc)
        return await call(service.query, req)

    async def chunk_neighbours(request: Request) -> JSONResponse:
        try:
            params = dict(request.query_params)
            body = {"chunk_ids": [int(request.path_params["chunk_id"])]}
            for name in ("k", "ef"):
                if name in params:
                    body[name] = _parse_int(params[name], name)
            for name in ("exact", "exclude_same_doc"):
                if name in params:
                    body[name] = params[name].lower() in ("1", "true", "yes")
            req = QueryRequest.from_json(body)
        except BadRequest as exc:
            return error(exc)
        return await call(service.query, req)

    async def generate(request: Request) -> JSONResponse:
        try:
            req = GenerateRequest.from_json(await body_of(request))
        except BadRequest as exc:
            return error(exc)
        return await call(service.generate, req)

    async def evaluate(request: Request) -> JSONResponse:
        try:
            req = EvalRequest.from_json(await body_of(request))
        except BadRequest as exc:
            return error(exc)
        return await call(service.eval, req)

    async def document(request: Request) -> JSONResponse:
        doc_id = request.query_params.get("doc_id")
        if not doc_id:
            return error(BadRequest("give ?doc_id=..."))
        return await call(service.document, doc_id)

    async def stats(request: Request) -> JSONResponse:
        return await call(service.stats)

    async def health(request: Request) -> JSONResponse:
        return await call(service.health)

    async def page(request: Request) -> HTMLResponse:
        return HTMLResponse(page_html())

    routes = [
        Route("/", page),
        Route("/api/health", health),
        Route("/api/stats", stats),
        Route("/api/query", query, methods=["POST"]),
        Route("/api/chunks/{chunk_id:int}/neighbours", chunk_neighbours),
        Route("/api/document", document),
        Route("/api/generate", generate, methods=["POST"]),
        Route("/api/eval", evaluate, methods=["POST"]),
    ]
    return Starlette(routes=routes)


def _parse_int(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, not {value!r}") from None


def check_host(host: str, explicit: bool) -> str | None:
    """Loopback is the default. Another address needs --host given explicitly; the warning to print."""
    if host in LOOPBACK:
        return None
    if not explicit:
        raise RetrodbError(f"refusing to listen on {host} without --host given explicitly",
                           hint=f"retrodb serve DB --host {host} (the server has no authentication)")
    return (f"listening on {host}: anyone who can reach this address can read the whole database; "
            "the server has no authentication")


def serve(root: str | Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, device: str = "auto",
          threads: int | None = None, model: str | Path | None = None, log_level: str = "warning",
          on_ready: Callable[[str], None] | None = None, on_note: Callable[[str], None] | None = None,
          warm: bool = True) -> None:
    """Run the server until interrupted. `warm` loads the embedder and indexes before accepting requests.
    `model`: the RETRO model for generate and eval (default: the bundled one, if it fits the database)."""
    from .errors import require

    uvicorn = require("uvicorn", "serve")
    service = Service(root, device=device, threads=threads, model=model)
    if on_note is not None and service.model_note:
        on_note(f"no RETRO model (generate and eval are off): {service.model_note}")
    if warm:
        service.warm()
    config = uvicorn.Config(create_app(service), host=host, port=port, log_level=log_level, access_log=False)
    server = uvicorn.Server(config)
    if on_ready is not None:
        _announce_when_started(server, on_ready, host, port)
    server.run()


def _announce_when_started(server, on_ready, host: str, port: int) -> None:
    def wait() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.02)
        if server.started:
            bound = port
            for srv in getattr(server, "servers", []):
                for sock in srv.sockets:
                    bound = sock.getsockname()[1]
            shown = f"[{host}]" if ":" in host else host
            on_ready(f"http://{shown}:{bound}/")

    threading.Thread(target=wait, daemon=True).start()
