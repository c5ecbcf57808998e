"""retrodb: the database-lifecycle library for retrieval-enhanced language models (RETRO).

    import retrodb
    db = retrodb.open("my-db")          # current snapshot
    db.stats(); db.sql("SELECT count(*) FROM chunks")

Heavy dependencies (torch, transformers, hnswlib) are imported only by the
functions that need them.
"""

from .database import Database, open
from .errors import RetrodbError

__version__ = "0.1.0"
__all__ = ["Database", "RetrodbError", "open", "__version__"]
