"""Print the Assurance figures (README.md) from a run of the attack and fault suites.

    make assurance        # runs the suites with CATALYST_ASSURANCE_OUT set, then this

The figures come from the suites themselves (tests/conftest.py ``Assurance``);
the soak figures from the newest ``bench/results/soak-*.json``, if any.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(figures_file: str, soak_dir: str = "bench/results") -> int:
    figures = json.loads(Path(figures_file).read_text())
    print("| figure | value |")
    print("|---|---|")
    failed = False
    for name, value in sorted(figures.items()):
        must_be_zero = "(must be 0)" in name
        failed |= must_be_zero and value != 0
        print(f"| {name} | {value:g}{'' if not must_be_zero or value == 0 else '  **FAIL**'} |")
    soaks = sorted(Path(soak_dir).glob("soak-*.json"))
    if soaks:
        soak = json.loads(soaks[-1].read_text())
        for name, value in soak.get("figures", soak).items():
            if isinstance(value, int | float | str):
                print(f"| soak ({soaks[-1].name}): {name} | {value} |")
    else:
        print("| soak | not run here (make soak) |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
