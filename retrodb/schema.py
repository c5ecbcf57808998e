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
