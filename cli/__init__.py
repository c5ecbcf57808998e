"""The `retrodb` command line: a thin typer layer over the `retrodb` library."""
