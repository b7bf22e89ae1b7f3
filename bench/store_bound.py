"""``make bench``'s small-store row: the gateway with the memory store bounded at a few KiB.

    python bench/store_bound.py serve --host 127.0.0.1 --port P   (CATALYST_BENCH_STORE_BYTES=65536)

Runs ``catalyst-proxy`` unchanged except for the memory idempotency store's byte
bound (8 MiB by default). Loaded with a new key on every request, the default
store keeps ~10,000 records and frees each, cold, ~2.5 s after it was written;
a 64 KiB store frees them while they are still in the CPU's caches. The two
rows side by side separate what the keyed path's code costs from what the
store's footprint costs on this machine's caches. Bench-only: nothing here is
in the wheel.
"""

from __future__ import annotations

import os
import sys

from catalyst_proxy import cli
from catalyst_proxy.idempotency.memory import MemoryRecords

if __name__ == "__main__":
    defaults = MemoryRecords.__init__.__kwdefaults__
    if not defaults or "max_bytes" not in defaults:
        raise SystemExit("store_bound: MemoryRecords() no longer takes max_bytes=")
    defaults["max_bytes"] = int(os.environ["CATALYST_BENCH_STORE_BYTES"])
    cli.main(sys.argv[1:])
