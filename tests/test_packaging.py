"""Packaging: `pip install .` builds without setuptools warnings and installs the package only."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_builds_without_warnings_and_holds_the_package_only(tmp_path: Path) -> None:
    """Building the wheel prints no setuptools warning (license, package discovery), and the
    wheel holds every catalyst_proxy package and nothing from tests/, bench/ or deploy/."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-v", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    noisy = [
        line
        for line in (out.stdout + out.stderr).splitlines()
        if ("Warning" in line or "deprecated" in line.lower())
        and "WARNING: Location" not in line  # the machine's pip index settings, not ours
    ]
    assert not noisy, noisy
    [wheel] = tmp_path.glob("catalyst_proxy-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"catalyst_proxy", wheel.name.split("-py3")[0] + ".dist-info"}
    packages = {name.rsplit("/", 1)[0] for name in names if name.endswith("/__init__.py")}
    expected = {
        str(path.parent.relative_to(ROOT))
        for path in (ROOT / "catalyst_proxy").rglob("__init__.py")
    }
    assert packages == expected


def test_the_package_imports_where_poll_is_not_linuxs() -> None:
    """The upstream client imports where ``select`` has no POLLRDHUP (macOS) or no ``poll``
    at all (Windows): it checks idle connections with what there is."""
    code = (
        "import select; del select.POLLRDHUP; import catalyst_proxy.cli\n"
        "del select.poll; import importlib, catalyst_proxy.upstream.connection as c; "
        "importlib.reload(c)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
