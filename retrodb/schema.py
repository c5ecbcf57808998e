"""pyarrow schemas built from the JSON files in `schemas/`, the single source of truth."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib import resources

import pyarrow as pa

_SCALARS = {
    "string": pa.string(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
}

TOKEN_TYPES = {"uint8": pa.uint8(), "uint16": pa.uint16(), "uint32": pa.uint32()}


@lru_cache(maxsize=None)
def spec(table: str) -> dict:
    """The raw JSON spec of a table (documents, chunks, tombstones, keys, manifest)."""
    return json.loads(resources.files("retrodb.schemas").joinpath(f"{table}.json").read_text())


def token_type_for(vocab_size: int) -> str:
    """The narrowest unsigned integer type name that holds every token id."""
    for name, limit in (("uint8", 1 << 8), ("uint16", 1 << 16)):
        if vocab_size <= limit:
            return name
    return "uint32"


def arrow_schema(table: str, token_type: str = "uint32") -> pa.Schema:
    fields = []
    for f in spec(table)["fields"]:
        kind = f["type"]
        if kind == "list<token>":
            typ = pa.list_(TOKEN_TYPES[token_type])
        else:
            typ = _SCALARS[kind]
        fields.append(pa.field(f["name"], typ, nullable=f["nullable"]))
    return pa.schema(fields)


_JSON_TYPES = {"int64": int, "string": str, "object": dict}
_COUNTS = ("documents", "chunks", "tokens")
_RECORD = {"path": str, "bytes": int, "sha256": str}


def _is(value, kind) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def manifest_problems(data) -> list[str]:
    """What in a manifest does not fit schemas/manifest.json (empty if it fits): a missing or mistyped field,
    a segment without counts or files, a file record that is incomplete or points outside the database."""
    if not isinstance(data, dict):
        return [f"it is a JSON {type(data).__name__}, not an object"]
    problems = []
    for f in spec("manifest")["fields"]:
        name, kind = f["name"], _JSON_TYPES[f["type"]]
        if name not in data or data[name] is None:
            if not f["nullable"]:
                problems.append(f"no '{name}' field")
        elif not _is(data[name], kind):
            problems.append(f"'{name}' is {type(data[name]).__name__}, not {f['type']}")
    config = data.get("config")
    if isinstance(config, dict):
        if not _is(config.get("chunk_size"), int):
            problems.append("config has no chunk_size")
        if not isinstance(config.get("tokenizer"), dict):
            problems.append("config has no tokenizer")
    for seg_name, seg in (data.get("segments") or {}).items() if isinstance(data.get("segments"), dict) else ():
        where = f"segment {seg_name!r}"
        if not isinstance(seg, dict) or not isinstance(seg.get("files"), dict):
            problems.append(f"{where} has no files")
            continue
        problems += [f"{where} has no '{k}' count" for k in _COUNTS if not _is(seg.get(k), int)]
        for kind, rec in seg["files"].items():
            if not isinstance(rec, dict) or not all(_is(rec.get(k), t) for k, t in _RECORD.items()):
                problems.append(f"{where}: the {kind} file record is incomplete")
            elif not _inside(rec["path"]):
                problems.append(f"{where}: the {kind} file path {rec['path']!r} is outside the database's segments")
    return problems


def _inside(path: str) -> bool:
    parts = path.split("/")
    return len(parts) >= 3 and parts[0] == "segments" and not any(p in ("", ".", "..") for p in parts) \
        and "\\" not in path and not path.startswith("/")
