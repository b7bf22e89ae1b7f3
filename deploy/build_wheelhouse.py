"""Build the wheelhouse the container image installs from, on the build host.

    .venv/bin/python deploy/build_wheelhouse.py deploy/dist

writes into OUT (emptied first):

1. the project's wheel (``pip wheel --no-deps``, from a clean copy of the source);
2. binary wheels of its run-time dependencies, with the ``fast`` extra
   (uvloop), pinned by ``constraints.txt`` and chosen for the image's
   interpreter, not the host's: CPython 3.11 on glibc 2.36 (Debian bookworm),
   same CPU architecture as the host;
3. ``requirements.txt``: every wheel pinned by version and sha256, which the
   Dockerfile installs with ``--no-index --require-hashes``.

The dependency list is read from the project's own metadata, never repeated.
"""
# ruff: noqa: S603  (runs pip with arguments built here, never from input)

from __future__ import annotations

import argparse
import hashlib
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON_VERSION = "3.11"  # the image's interpreter (bookworm's python3, python:3.11-*)
# Wheels a dependency needs on bookworm's python3 (3.11.2) that pip download leaves out,
# because it judges ``python_full_version`` markers by the host's interpreter, not by
# --python-version: redis needs async-timeout below 3.11.3.
IMAGE_EXTRAS = ("async-timeout",)
GLIBC_MINOR = 36  # Debian bookworm's glibc 2.36
EXTRAS = "fast"
WHEEL_NAME = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)(-\d[^-]*)?-[^-]+-[^-]+-[^-]+\.whl$")


def manylinux_platforms(machine: str) -> list[str]:
    """Every manylinux tag a glibc-2.36 system runs, newest first (pip will not expand them)."""
    tags = [f"manylinux_2_{minor}_{machine}" for minor in range(GLIBC_MINOR, 16, -1)]
    return [*tags, f"manylinux2014_{machine}"]  # pip expands this one to 2010 and 1


def pip(*args: str) -> None:
    """Run pip quietly; show what it said only when it fails."""
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet", *args]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"build_wheelhouse: pip {args[0]} failed (exit {done.returncode})")


def clean_source(scratch: Path) -> Path:
    """A copy of what the wheel is made of: setuptools builds in the source tree and
    leaves build/ behind, whose stale modules would otherwise end up in the wheel."""
    source = scratch / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "catalyst_proxy",
        source / "catalyst_proxy",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    return source


def build(out: Path) -> Path:
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as scratch:
        pip("wheel", "--no-deps", "--wheel-dir", str(out), str(clean_source(Path(scratch))))
    (project_wheel,) = out.glob("catalyst_proxy-*.whl")
    platforms = [
        arg for tag in manylinux_platforms(platform.machine()) for arg in ("--platform", tag)
    ]
    pip(
        "download",
        "--only-binary=:all:",
        "--python-version", PYTHON_VERSION,
        "--implementation", "cp",
        *platforms,
        "--constraint", str(ROOT / "constraints.txt"),
        "--dest", str(out),
        f"{project_wheel}[{EXTRAS}]",
        *IMAGE_EXTRAS,
    )  # fmt: skip
    return write_requirements(out, project_wheel.name)


def write_requirements(out: Path, project_wheel: str) -> Path:
    """Pin every wheel in OUT by name, version and sha256; the project with its extra."""
    lines = []
    for wheel in sorted(out.glob("*.whl")):
        match = WHEEL_NAME.match(wheel.name)
        if match is None:
            raise SystemExit(f"build_wheelhouse: cannot parse wheel name {wheel.name}")
        name = match["name"] + (f"[{EXTRAS}]" if wheel.name == project_wheel else "")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        lines.append(f"{name}=={match['version']} --hash=sha256:{digest}")
    requirements = out / "requirements.txt"
    requirements.write_text("\n".join(lines) + "\n")
    return requirements


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="wheelhouse folder (emptied first)")
    requirements = build(parser.parse_args().out.resolve())
    print(
        f"wheelhouse: {requirements.parent} ({len(requirements.read_text().splitlines())} wheels)"
    )


if __name__ == "__main__":
    main()
