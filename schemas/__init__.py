"""Table schemas of a retrodb database, as JSON data files.

These files are the single source of truth for every table the code writes:
`retrodb.schema` turns them into pyarrow schemas, and `verify` checks files
against them. This module only makes the folder importable as package data.
"""
