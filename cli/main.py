"""`retrodb`: entry point. Registers one module per command group and maps errors to exit codes.

Exit codes: 0 success, 1 a known error (message on stderr, no traceback),
2 usage error. An OSError (disk full, permission denied) and a database file
that cannot be decoded are known errors too: one line naming the file, and
for a damaged file the `verify` to run. RETRODB_DEBUG=1 shows tracebacks.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

try:  # typer >= 0.20 vendors click; older releases use the click package
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover
    from click import exceptions as click_exceptions

from . import db as db_commands
from . import edit as edit_commands
from . import embed as embed_commands
from . import index as index_commands
from . import ingest as ingest_commands
from . import leakage as leakage_commands
from . import neighbours as neighbours_commands
from . import model as model_commands
from . import query as query_commands
from . import redact as redact_commands
from . import serve as serve_commands
from . import verify as verify_commands

HELP = """Build, edit and query the retrieval database of a RETRO model.

[bold]Examples[/]

  retrodb ingest my-db corpus/            # chunk a folder of .txt/.md/.jsonl/.parquet
  retrodb embed my-db                     # frozen-BERT keys (GPU if present)
  retrodb stats my-db
  retrodb sql my-db "SELECT doc_id, count(*) FROM chunks GROUP BY 1 LIMIT 5"
  retrodb log my-db
  retrodb add my-db new-docs/             # ingest + embed + index, one commit
  retrodb delete my-db --doc-id doc01.txt
  retrodb compact my-db && retrodb vacuum my-db --yes
  retrodb verify my-db
  retrodb neighbours my-db                # training neighbours of every chunk (k=2)
  retrodb leakage my-db eval.txt --dedup  # how much of an evaluation text the database holds
  retrodb eval my-db held-out.txt         # bits per byte with and without retrieval (bundled model)
  retrodb generate my-db "def parse("     # retrieves for each chunk as the text grows
  retrodb serve my-db                     # neighbour debugger at http://127.0.0.1:8750/
"""

app = typer.Typer(
    name="retrodb",
    help=HELP,
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
def _print_version(value: bool) -> None:
    if value:
        from retrodb import __version__

        print(f"retrodb {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    pass


db_commands.register(app)
ingest_commands.register(app)
embed_commands.register(app)
index_commands.register(app)
query_commands.register(app)
redact_commands.register(app)
edit_commands.register(app)
verify_commands.register(app)
neighbours_commands.register(app)
leakage_commands.register(app)
model_commands.register(app)
serve_commands.register(app)


def _error(message: str, hint: str | None = None) -> None:
    print(f"error: {message}" + (f"\n  hint: {hint}" if hint else ""), file=sys.stderr)


def run(argv: list[str]) -> int:
    """Run the CLI on `argv`; returns the exit code instead of exiting (tests call this)."""
    from retrodb.errors import RetrodbError, UsageError

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        result = app(args=argv, prog_name="retrodb", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except typer.Exit as exc:
        return exc.exit_code
    except click_exceptions.ClickException as exc:
        exc.show()
        return exc.exit_code
    except typer.Abort:
        print("aborted", file=sys.stderr)
        return 1
    except RetrodbError as exc:
        if os.environ.get("RETRODB_DEBUG"):
            raise
        _error(exc.message, exc.hint)
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except OSError as exc:  # the operating system refused: disk full, permission denied, ...
        if os.environ.get("RETRODB_DEBUG") or exc.errno is None:
            raise
        _error(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
        return 1
    except Exception as exc:  # a bug: say so, and how to see the traceback
        if os.environ.get("RETRODB_DEBUG"):
            raise
        from retrodb.database import undecodable

        damaged = undecodable(exc, None, argv[0] if argv else "retrodb")
        if damaged is not None:
            _error(damaged.message, damaged.hint)
            return 1
        print(f"internal error: {type(exc).__name__}: {exc}\n  rerun with RETRODB_DEBUG=1 for the traceback, "
              "and please report it", file=sys.stderr)
        return 1


def main() -> None:
    sys.exit(run(sys.argv[1:]))
