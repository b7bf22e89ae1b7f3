"""A purchase happens once: ``Idempotency-Key`` (reference.md "Idempotency").

- ``keys.py``: the header's syntax, the key's scope, the request's fingerprint;
- ``records.py``: a record's life and bytes, and the store interface;
- ``memory.py`` / ``redis_records.py``: the two stores;
- ``guard.py``: the modes per route and one ``Attempt`` per keyed request.
"""

from .guard import Attempt, Idempotency, route_modes
from .keys import covered, fingerprinter, parse_key, partial_fingerprint
from .memory import MemoryRecords
from .records import Record, Records
from .redis_records import RedisRecords

__all__ = [
    "Attempt",
    "Idempotency",
    "MemoryRecords",
    "Record",
    "Records",
    "RedisRecords",
    "covered",
    "fingerprinter",
    "parse_key",
    "partial_fingerprint",
    "route_modes",
]
