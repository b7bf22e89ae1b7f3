"""The documentation: generated tables up to date, the error tree and the variables
declared once, and a repository that stands alone.

The generated regions of README.md and docs/reference.md are rebuilt in memory
by ``catalyst_proxy.devtools.reference`` and compared with the files; ``make
docs`` rewrites them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

from catalyst_proxy import errors, log
from catalyst_proxy.config import DECLARED, VARIABLES, ConfigError, Settings, Variable
from catalyst_proxy.devtools import reference
from catalyst_proxy.errors import every_error

ROOT = Path(__file__).resolve().parent.parent
KC_ADDR = "http://keycloak.test"

# Paths of the repository that must not point outside it.
STANDALONE = ("README.md", "Makefile", "docs", "tests", "catalyst_proxy", "deploy", "bench", ".ci")
SKIPPED_DIRS = {"__pycache__", "dist"}  # build output (ignored by git)
# Spelled in pieces so that this file does not mention what it looks for.
OUTSIDE = (
    re.compile(re.escape("/".join(("..", "shared")))),
    re.compile(re.escape("/".join(("", "work", "shared")))),
    re.compile("parent" + r"\s*/\s*['\"]" + "shared"),  # a path built from the root's parent
)


# --- generated regions ------------------------------------------------------------------------


@pytest.mark.parametrize("document", reference.DOCUMENTS)
def test_generated_regions_are_up_to_date(document: str) -> None:
    """Every generated table in the document is what the code produces now (run `make docs`)."""
    text = (ROOT / document).read_text(encoding="utf-8")
    assert reference.render(text) == text, f"{document} is stale: run `make docs`"


@pytest.mark.parametrize(
    ("document", "names"),
    [
        ("README.md", ["variables", "errors", "metrics"]),
        ("docs/reference.md", ["routes", "errors", "metrics", "variables"]),
    ],
)
def test_documents_hold_their_generated_regions(document: str, names: list[str]) -> None:
    """Each document keeps the generated regions it is meant to have, so staleness is checked."""
    assert reference.regions((ROOT / document).read_text(encoding="utf-8")) == names


def test_render_replaces_only_the_region() -> None:
    """render() rebuilds the text between the markers and leaves everything around it alone."""
    text = "before\n<!-- generated: variables -->\nold table\n<!-- end generated -->\nafter\n"
    rendered = reference.render(text)
    assert rendered.startswith("before\n<!-- generated: variables -->\n\n| variable |")
    assert rendered.endswith("\n\n<!-- end generated -->\nafter\n")
    assert "old table" not in rendered
    assert reference.render(rendered) == rendered


@pytest.mark.parametrize(
    "text",
    [
        "<!-- generated: colours -->\n<!-- end generated -->\n",
        "<!-- generated: errors -->\nno end\n",
        "<!-- generated: errors -->\n<!-- end generated -->\n<!-- end generated -->\n",
    ],
)
def test_malformed_markers_are_refused(text: str) -> None:
    """An unknown region name or an unmatched marker is an error, never silently skipped."""
    with pytest.raises(reference.RegionError):
        reference.render(text)


def test_check_reports_a_stale_document_and_make_docs_fixes_it(tmp_path: Path) -> None:
    """`--check` exits 1 naming a stale document; a plain run rewrites it and `--check` passes."""
    for name in reference.DOCUMENTS:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(
            "<!-- generated: errors -->\n| stale |\n<!-- end generated -->\n", encoding="utf-8"
        )
    assert reference.main(["--check", "--root", str(tmp_path)]) == 1
    assert "| stale |" in (tmp_path / "README.md").read_text(encoding="utf-8")
    assert reference.main(["--root", str(tmp_path)]) == 0
    assert reference.main(["--check", "--root", str(tmp_path)]) == 0
    assert "`sme-gateway-unreachable`" in (tmp_path / "README.md").read_text(encoding="utf-8")


def test_every_variable_and_error_is_a_row() -> None:
    """The variables table has one row per declared variable, the error table one per answer."""
    variables = reference.variables_table()
    for variable in VARIABLES:
        assert f"| `{variable.name}` |" in variables
    assert variables.count("\n") == len(VARIABLES) + 2
    table = reference.errors_table()
    for cls in every_error():
        assert f"| {cls.status} | `{cls.code}` | `{cls.forwarded}` |" in table
    assert table.count("\n") == len(every_error()) + 2


# --- the error tree ---------------------------------------------------------------------------


def docstring_tree() -> list[tuple[str, int, str]]:
    """(class, status, code) for each line of the tree drawn in errors.py's docstring."""
    assert errors.__doc__ is not None
    line = re.compile(r"^\s*[├└]── (\w+)\s+(\d{3})\s+([a-z-]+)", re.MULTILINE)
    return [(name, int(status), code) for name, status, code in line.findall(errors.__doc__)]


def test_the_docstring_tree_is_the_error_classes() -> None:
    """errors.py's drawn tree is exactly every_error(), in order, with each status and code."""
    drawn = docstring_tree()
    assert drawn, "no tree found in the errors.py docstring"
    assert drawn == [(cls.__name__, cls.status, cls.code) for cls in every_error()]


@pytest.mark.parametrize("cls", every_error(), ids=lambda cls: cls.code)
def test_every_error_says_what_it_means_and_what_to_do(cls: type[errors.ProxyError]) -> None:
    """Each answer class lives in errors.py, has its own docstring and advice, and a forwarded
    value the X-Catalyst-Forwarded header can carry."""
    assert cls.__module__ == errors.__name__, f"{cls.__name__} belongs in errors.py's tree"
    assert reference.meaning(cls), f"{cls.__name__} has no docstring of its own"
    assert cls.advice, f"{cls.__name__} has no advice"
    assert cls.forwarded in ("no", "yes", "unknown")


def test_error_codes_are_unique() -> None:
    """No two answer classes share an `error` code, so a client can branch on it alone."""
    codes = [cls.code for cls in every_error()]
    assert len(codes) == len(set(codes))


# --- the variables ----------------------------------------------------------------------------


class RecordingEnviron(Mapping[str, str]):
    """An environment that remembers every name looked up in it."""

    def __init__(self, values: Mapping[str, str]) -> None:
        self.values = dict(values)
        self.read: set[str] = set()

    def __getitem__(self, name: str) -> str:
        self.read.add(name)
        return self.values[name]

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str):
            self.read.add(name)
        return name in self.values

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


def names_read(values: Mapping[str, str]) -> set[str]:
    environ = RecordingEnviron(values)
    with contextlib.suppress(ConfigError):  # no key source: raised after every read
        Settings.from_env(environ)
    return environ.read


# Environments that between them take every branch of from_env: nothing set (the fallbacks
# are read), and a Keycloak address (so the realm is read too).
BRANCHES: tuple[dict[str, str], ...] = ({}, {"CATALYST_KC_ADDR": KC_ADDR})


def test_every_variable_read_is_declared() -> None:
    """Settings.from_env reads no environment variable that VARIABLES does not declare."""
    read = set().union(*(names_read(values) for values in BRANCHES))
    assert read - DECLARED == set()


def test_every_declared_variable_is_read() -> None:
    """Every variable VARIABLES declares is read by Settings.from_env (none is documented only)."""
    read = set().union(*(names_read(values) for values in BRANCHES))
    assert DECLARED - read == set()


def test_variables_are_declared_once() -> None:
    """No variable is declared twice, so each has one default and one meaning."""
    names = [variable.name for variable in VARIABLES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize(
    "variable", [v for v in VARIABLES if v.default is not None], ids=lambda v: v.name
)
def test_documented_defaults_are_the_real_ones(variable: Variable) -> None:
    """Setting a variable to its documented default gives the same Settings as leaving it unset."""
    base = {"CATALYST_KC_ADDR": KC_ADDR}
    documented = Settings.from_env({**base, variable.name: str(variable.default)})
    assert documented == Settings.from_env(base)


def test_the_reference_names_only_declared_variables() -> None:
    """Every variable docs/reference.md mentions is declared: the prose names no dead variable."""
    text = (ROOT / "docs/reference.md").read_text(encoding="utf-8")
    named = set(re.findall(r"\b(?:CATALYST_[A-Z_]*[A-Z]|OPERATOR_EMAIL)\b", text))
    assert named - DECLARED == set()


# --- standing alone ---------------------------------------------------------------------------


def repository_files() -> Iterator[Path]:
    for entry in STANDALONE:
        path = ROOT / entry
        if path.is_file():
            yield path
        for file in sorted(path.rglob("*")) if path.is_dir() else ():
            if file.is_file() and not SKIPPED_DIRS.intersection(file.relative_to(ROOT).parts):
                yield file


def test_nothing_points_outside_the_repository() -> None:
    """No file of the repository reads or links the sibling shared folder: a clone stands alone."""
    files = list(repository_files())
    assert ROOT / "README.md" in files
    assert ROOT / "docs/reference.md" in files
    offenders = []
    for file in files:
        text = file.read_bytes().decode("utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            if any(pattern.search(line) for pattern in OUTSIDE):
                offenders.append(f"{file.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_the_reference_names_every_log_event() -> None:
    """Every event the gateway logs (the names in catalyst_proxy/log.py) is named in
    docs/reference.md's *Logs*: an operator looking up a line finds it there."""
    text = (ROOT / "docs/reference.md").read_text()
    events = {
        value for name, value in vars(log).items()
        if name.isupper() and isinstance(value, str) and re.fullmatch(r"[a-z_]+(\.[a-z_]+)?", value)
    }  # fmt: skip
    assert len(events) > 20
    assert sorted(event for event in events if f"`{event}`" not in text) == []
