"""pyarrow schemas built from the JSON files in `schemas/`, the single source of truth."""

from __future__ import annotations

import json
import re
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


_JSON_TYPES = {"int64": int, "string": str, "object": dict, "array": list}
_COUNTS = ("documents", "chunks", "tokens")
_RECORD = {"path": str, "bytes": int, "sha256": str}
# a segment file's path as retrodb writes it: checked by one match (a group lists ~1,000 segments' files);
# anything else takes the general check of `_inside`
_SEGMENT_FILE = re.compile(r"segments(?:/[A-Za-z0-9_-][A-Za-z0-9._-]*){2,}")


def _is(value, kind) -> bool:
    return isinstance(value, kind) and not (kind is int and isinstance(value, bool))


def _fields_problems(data: dict, table: str, format_version: int | None = None) -> list[str]:
    problems = []
    for f in spec(table)["fields"]:
        if format_version is not None and f.get("format", format_version) != format_version:
            continue
        name, kind = f["name"], _JSON_TYPES[f["type"]]
        if name not in data or data[name] is None:
            if not f["nullable"]:
                problems.append(f"no '{name}' field")
        elif not _is(data[name], kind):
            problems.append(f"'{name}' is {type(data[name]).__name__}, not {f['type']}")
    return problems


def manifest_problems(data) -> list[str]:
    """What in a root manifest does not fit schemas/manifest.json (empty if it fits): a missing or mistyped field,
    a group, id run or index unit record that is incomplete or points outside the database (format 1: a segment
    without counts or files)."""
    if not isinstance(data, dict):
        return [f"it is a JSON {type(data).__name__}, not an object"]
    version = data.get("format_version")
    version = version if _is(version, int) and version >= 2 else 1
    problems = _fields_problems(data, "manifest", version)
    config = data.get("config")
    if isinstance(config, dict):
        if not _is(config.get("chunk_size"), int):
            problems.append("config has no chunk_size")
        if not isinstance(config.get("tokenizer"), dict):
            problems.append("config has no tokenizer")
    if version == 1:
        return problems + _segments_problems(data.get("segments"))
    listing = data.get("groups")
    if isinstance(listing, dict):
        if not all(_is(listing.get(k), t) for k, t in _RECORD.items()) or not _is(listing.get("count"), int):
            problems.append("the group list record is incomplete")
        elif not _inside(listing["path"], ("manifests/groups",)):
            problems.append(f"group list path {listing['path']!r} is outside the database's manifests")
    if not isinstance(data.get("totals"), dict):
        problems.append("no 'totals'")
    for r in data.get("ids") if isinstance(data.get("ids"), list) else ():
        if not isinstance(r, dict) or not all(_is(r.get(k), t) for k, t in _RECORD.items()) \
                or not _is(r.get("rows"), int):
            problems.append("an id run record is incomplete")
        elif not _inside(r["path"], ("ids",)):
            problems.append(f"id run path {r['path']!r} is outside the database's ids")
    for u in data.get("indexes") if isinstance(data.get("indexes"), list) else ():
        if not isinstance(u, dict) or u.get("kind") not in ("segment", "shard") or not isinstance(u.get("files"), dict) \
                or not _is(u.get("vectors"), int) or not _is(u.get("live"), int) or not _is(u.get("name"), str):
            problems.append("an index unit is incomplete")
            continue
        if u["kind"] == "segment" and not _is(u.get("segment"), int):
            problems.append(f"index unit {u['name']!r} names no segment")
        for kind, rec in u["files"].items():
            if rec is None and kind in ("tombstones", "dead"):
                continue
            if not isinstance(rec, dict) or not all(_is(rec.get(k), t) for k, t in _RECORD.items()):
                problems.append(f"index unit {u['name']!r}: the {kind} file record is incomplete")
            elif not _inside(rec["path"], ("segments", "indexes")):
                problems.append(f"index unit {u['name']!r}: the {kind} file path {rec['path']!r} is outside the database")
    return problems


def group_list_problems(data) -> list[str]:
    """What in a group list (manifests/groups/l-*.json) does not fit: each reference {lo, path, bytes, sha256,
    summary}, inside the database's manifests, in order of lo."""
    if not isinstance(data, dict) or not isinstance(data.get("groups"), list):
        return ["it is not an object with a 'groups' list"]
    problems, last = [], None
    for g in data["groups"]:
        if not isinstance(g, dict) or not _is(g.get("lo"), int) or not isinstance(g.get("summary"), dict) \
                or not all(_is(g.get(k), t) for k, t in _RECORD.items()):
            problems.append("a group reference is incomplete")
        elif not _inside(g["path"], ("manifests/groups",)):
            problems.append(f"group manifest path {g['path']!r} is outside the database's manifests")
        elif last is not None and g["lo"] <= last:
            problems.append("group references are not in order of their segment numbers")
        elif not isinstance(g.get("removed", []), list) or not all(_is(n, int) and n >= g["lo"]
                                                                     for n in g.get("removed", [])):
            problems.append(f"group {g['path']}: 'removed' is not a list of segment numbers of its range")
        else:
            last = g["lo"]
    return problems


def group_problems(data) -> list[str]:
    """What in a group manifest does not fit schemas/group.json (empty if it fits)."""
    if not isinstance(data, dict):
        return [f"it is a JSON {type(data).__name__}, not an object"]
    return _fields_problems(data, "group") + _segments_problems(data.get("segments"))


def _segments_problems(segments) -> list[str]:
    problems = []
    for seg_name, seg in segments.items() if isinstance(segments, dict) else ():
        where = f"segment {seg_name!r}"
        if not _is(seg_name, str) or not seg_name.startswith("seg-") or not seg_name[4:].isdigit():
            problems.append(f"{where} is not a segment name")
            continue
        if not isinstance(seg, dict) or not isinstance(seg.get("files"), dict):
            problems.append(f"{where} has no files")
            continue
        problems += [f"{where} has no '{k}' count" for k in _COUNTS if not _is(seg.get(k), int)]
        for kind, rec in seg["files"].items():
            if not (isinstance(rec, dict) and type(rec.get("path")) is str and type(rec.get("bytes")) is int
                    and type(rec.get("sha256")) is str):
                problems.append(f"{where}: the {kind} file record is incomplete")
            elif not (_SEGMENT_FILE.fullmatch(rec["path"]) or _inside(rec["path"], ("segments",))):
                problems.append(f"{where}: the {kind} file path {rec['path']!r} is outside the database's segments")
    return problems


def _inside(path: str, tops: tuple[str, ...]) -> bool:
    parts = path.split("/")
    ok_top = any(parts[: len(t.split("/"))] == t.split("/") for t in tops)
    return ok_top and len(parts) >= 2 and not any(p in ("", ".", "..") for p in parts) \
        and "\\" not in path and not path.startswith("/") and (parts[0] != "segments" or len(parts) >= 3)
