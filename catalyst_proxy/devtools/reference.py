"""The generated tables of README.md and docs/reference.md, rewritten by ``make docs``.

A table the code can produce is not written by hand: it sits in a document
between two markers,

::

    <!-- generated: errors -->
    ...
    <!-- end generated -->

and ``render()`` replaces what is between them with a fresh table built from
the code: ``variables`` from ``config.VARIABLES``, ``errors`` from
``errors.every_error()`` (each class's docstring opens with its meaning, its
``advice`` says what to do), ``routes`` from ``routes.DEFAULT_ROUTES`` and
``metrics`` from the metrics the gateway defines. ``tests/test_docs.py``
renders every document in memory and fails when the file differs.

Run ``python -m catalyst_proxy.devtools.reference [--check] [--root DIR]``.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from ..config import VARIABLES
from ..errors import every_error
from ..metrics import Metrics, Tally
from ..routes import DEFAULT_ROUTES

DOCUMENTS = ("README.md", "docs/reference.md")
END = "<!-- end generated -->"
_REGION = re.compile(
    rf"(?P<start><!-- generated: (?P<name>[a-z-]+) -->\n)(?P<body>.*?)(?P<end>{re.escape(END)})",
    re.DOTALL,
)
_START = re.compile(r"<!-- generated: (?P<name>[^ ]*) -->")


class RegionError(ValueError):
    """A document's markers are malformed: an unknown name, or a start without its end."""


def _cell(text: str) -> str:
    """``text`` as one Markdown table cell: one line, reST ``literals`` as `code`, ``|`` escaped."""
    text = " ".join(text.split())
    return text.replace("``", "`").replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def meaning(cls: type) -> str:
    """The first paragraph of a class's own docstring ("" when it has none)."""
    doc = cls.__dict__.get("__doc__")
    return inspect.cleandoc(doc).split("\n\n")[0] if doc else ""


def variables_table() -> str:
    rows = [
        (f"`{v.name}`", "—" if v.default is None else f"`{v.default}`", v.meaning)
        for v in VARIABLES
    ]
    return _table(("variable", "default", "meaning"), rows)


def errors_table() -> str:
    rows = [
        (str(cls.status), f"`{cls.code}`", f"`{cls.forwarded}`", meaning(cls), cls.advice)
        for cls in every_error()
    ]
    return _table(("status", "`error`", "`X-Catalyst-Forwarded`", "meaning", "what to do"), rows)


def routes_table() -> str:
    rows = [
        (", ".join(r.methods), f"`{r.path}`", r.upstream_method, f"`{r.upstream_path}`")
        for r in DEFAULT_ROUTES
    ]
    return _table(("client method", "client path", "upstream method", "upstream path"), rows)


def metrics_table() -> str:
    suffix = {"counter": "_total"}  # the exposition adds it; the definition omits it
    rows = []
    for metric in vars(Metrics()).values():
        if isinstance(metric, MetricWrapperBase):
            kind = str(metric._type)
            labels = ", ".join(f"`{label}`" for label in metric._labelnames)
            name = f"`{metric._name}{suffix.get(kind, '')}`"
            rows.append((name, kind, labels, metric._documentation))
        elif isinstance(metric, Tally):
            labels = ", ".join(f"`{label}`" for label in metric.labels)
            rows.append((f"`{metric.name}_total`", "counter", labels, metric.documentation))
    return _table(("metric", "type", "labels", "meaning"), rows)


REGIONS: dict[str, Callable[[], str]] = {
    "variables": variables_table,
    "errors": errors_table,
    "routes": routes_table,
    "metrics": metrics_table,
}


def regions(text: str) -> list[str]:
    """The names of the generated regions in ``text``, in order; RegionError if malformed."""
    names = [m.group("name") for m in _START.finditer(text)]
    closed = [m.group("name") for m in _REGION.finditer(text)]
    for name in names:
        if name not in REGIONS:
            raise RegionError(f"unknown generated region {name!r} (known: {', '.join(REGIONS)})")
    if names != closed or text.count(END) != len(names):
        raise RegionError(f"every '<!-- generated: NAME -->' needs its own {END!r}")
    return names


def render(text: str) -> str:
    """``text`` with every generated region rebuilt from the code."""
    regions(text)
    return _REGION.sub(lambda m: m["start"] + "\n" + REGIONS[m["name"]]() + "\n" + m["end"], text)


def stale(root: Path) -> list[str]:
    """The documents under ``root`` whose generated regions differ from the code."""
    return [name for name in DOCUMENTS if render(_read(root, name)) != _read(root, name)]


def write(root: Path) -> list[str]:
    """Rewrite the stale documents under ``root``; return their names."""
    changed = stale(root)
    for name in changed:
        (root / name).write_text(render(_read(root, name)), encoding="utf-8")
    return changed


def _read(root: Path, name: str) -> str:
    return (root / name).read_text(encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m catalyst_proxy.devtools.reference")
    parser.add_argument("--root", type=Path, default=Path.cwd(), help="the repository [.]")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    try:
        names = stale(args.root) if args.check else write(args.root)
    except (OSError, RegionError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    verb = "stale" if args.check else "rewrote"
    for name in names:
        print(f"{verb}: {name}")
    return 1 if args.check and names else 0


if __name__ == "__main__":
    raise SystemExit(main())
