"""Job stores: the contract (``_base``), the row layout (``_rows``), migrations as data,
and the memory, SQLite and PostgreSQL implementations."""

from ._base import JobStore as JobStore
from ._base import JobWrite as JobWrite
from ._base import Member as Member
from ._base import SharedStore as SharedStore
from ._base import StoredJob as StoredJob
from ._base import WriteBatch as WriteBatch
from ._base import check_json as check_json
from ._memory import MemoryStore as MemoryStore
from ._postgres import PostgresStore as PostgresStore
from ._sqlite import SQLiteStore as SQLiteStore

__all__ = [
    "JobStore",
    "JobWrite",
    "Member",
    "MemoryStore",
    "PostgresStore",
    "SQLiteStore",
    "SharedStore",
    "StoredJob",
    "WriteBatch",
    "check_json",
]
