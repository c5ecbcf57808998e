"""A client for `retrodb serve`: the same queries as `Database.query`, answered by a warm server.

Standard library only (urllib), and no torch, transformers or hnswlib: a `retrodb query --server`
process costs its interpreter start and one HTTP round trip.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterable

from .errors import RetrodbError

TIMEOUT_S = 120.0


class ServerError(RetrodbError):
    """The server answered with an error, or could not be reached."""


def call(server: str, path: str, body: dict | None = None, timeout: float = TIMEOUT_S) -> dict:
    """GET (no body) or POST `body` as JSON to `server` + `path`; the decoded JSON answer."""
    url = server.rstrip("/") + path
    if not url.startswith(("http://", "https://")):
        raise ServerError(f"--server {server!r} is not an http:// or https:// URL",
                          hint="for example: --server http://127.0.0.1:8750")
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as res:
            return json.loads(res.read())
    except urllib.error.HTTPError as exc:
        try:
            payload = json.loads(exc.read())
        except ValueError:
            payload = {}
        raise ServerError(payload.get("error") or f"the server answered {exc.code} {exc.reason}",
                          hint=payload.get("hint")) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServerError(f"cannot reach the retrodb server at {server}: {reason}",
                          hint="start it with: retrodb serve DB (or leave out --server / unset RETRODB_SERVER)") from None
    except ValueError:
        raise ServerError(f"{url} did not answer with JSON; is it a retrodb server?") from None


def query(server: str, db: str | Path | None, texts: str | list[str] | None = None, k: int = 4, *, ef: int = 64,
          exact: bool = False, exclude_doc: str | Iterable[str] | None = None,
          chunk_ids: Iterable[int] | None = None, exclude_same_doc: bool = True,
          on_warning: Callable[[str], None] | None = None) -> list:
    """Like `Database.query`, sent to the server; `db` (if given) must be the database it serves."""
    from .query import Neighbour, QueryResult

    body: dict = {"k": k, "ef": ef, "exact": exact, "exclude_same_doc": exclude_same_doc}
    if texts is not None:
        body["texts"] = [texts] if isinstance(texts, str) else list(texts)
    if chunk_ids is not None:
        body["chunk_ids"] = [int(c) for c in chunk_ids]
    if exclude_doc:
        body["exclude_doc"] = [exclude_doc] if isinstance(exclude_doc, str) else list(exclude_doc)
    answer = call(server, "/api/query", body)
    if db is not None and Path(answer["path"]).resolve() != Path(db).resolve():
        raise ServerError(f"the server at {server} serves {answer['path']}, not {db}",
                          hint="start a server for this database: retrodb serve " + str(db))
    for w in answer.get("warnings", []):
        if on_warning:
            on_warning(w)
    fields = set(Neighbour.__dataclass_fields__)
    return [QueryResult(r["query"], [Neighbour(**{k: v for k, v in n.items() if k in fields}) for n in r["neighbours"]],
                        r.get("chunk_id"))
            for r in answer["results"]]
