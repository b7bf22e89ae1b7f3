"""Random identifiers (request IDs, the bridge token's ``jti``), a batch of OS randomness at a time.

``os.urandom()`` is a ``getrandom()`` system call per call, and a request used
two. Here one call fills a 4 KiB batch: 256 identifiers of 128 bits each, as
unpredictable as before. A forked worker starts with an empty batch, so two
processes never hand out the same bytes.
"""

from __future__ import annotations

import os

_BATCH = 4096
_ID_BYTES = 16

_batch = b""
_offset = 0


def hex_id() -> str:
    """32 hex digits (128 random bits), like ``uuid4().hex`` or ``secrets.token_hex(16)``."""
    global _batch, _offset
    if _offset + _ID_BYTES > len(_batch):
        _batch, _offset = os.urandom(_BATCH), 0
    start, _offset = _offset, _offset + _ID_BYTES
    return _batch[start:_offset].hex()


def _forget() -> None:
    global _batch, _offset
    _batch, _offset = b"", 0


os.register_at_fork(after_in_child=_forget)
