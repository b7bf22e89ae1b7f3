"""Print the Assurance figures (README.md): the attack, fault, leak, JWKS and fuzz suites.

    make assurance        # runs the suites with CATALYST_ASSURANCE_OUT set, then this

The figures come from the suites themselves (tests/conftest.py ``Assurance``), the
fuzz suite's as its case count and answers by status per run (tests/test_fuzz.py);
the soak's from the last ``make soak`` on this machine (``.cache/soak-latest.md``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(figures_file: str, soak_file: str = ".cache/soak-latest.md") -> int:
    figures = json.loads(Path(figures_file).read_text())
    print("| figure | value |")
    print("|---|---|")
    failed = False
    for name, value in sorted(figures.items()):
        must_be_zero = "(must be 0)" in name
        failed |= must_be_zero and value != 0
        print(f"| {name} | {value:g}{'' if not must_be_zero or value == 0 else '  **FAIL**'} |")
    soak = Path(soak_file)
    if soak.exists():
        print(f"\nLast soak ({soak_file}):\n")
        print(soak.read_text())
    else:
        print("\nNo soak on this machine yet: `make soak` (recorded runs: bench/README.md).")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
