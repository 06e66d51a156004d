"""The package's layout and its import rules, checked from the source.

Four parts (see each subpackage's docstring): the creator (one stdlib-only
file), ``client`` (talking to a creator), ``run`` (``sockcreator run``) and
``broker`` (``sockcreator serve``), plus the shared public modules
``activation`` and ``privileges``.  What each may import is data here; this
test reads every import statement of every module (with ``ast``, without
importing anything) and checks it against the rules.  It also imports every
documented path, so that the move kept them working.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

import sockcreator

PACKAGE = Path(sockcreator.__file__).resolve().parent
STDLIB = sys.stdlib_module_names

#: part -> the parts of this package its modules may import.  A part is a
#: subpackage, or a top-level module.  The creator imports nothing of ours.
#: ``_record`` (dataclass(frozen=True) without importing dataclasses, for
#: start-up time) imports nothing of ours, and any part but the creator may
#: use it.
MAY_IMPORT: dict[str, set[str]] = {
    "creator": set(),
    "_record": set(),
    "client": {"client", "_record"},
    "activation": {"_record"},
    "privileges": {"_record"},
    "_terminal": {"privileges"},
    "run": {"run", "client", "activation", "privileges", "_terminal", "broker.client", "_record"},
    "broker": {"broker", "client", "privileges", "_terminal", "activation", "_record"},
    "cli": {"cli", "client", "run", "broker.serve", "broker.status", "broker.client"},
    "__main__": {"cli"},
    "__init__": {"client", "broker.client", "broker.aio"},
    # documented paths kept from before the layout: re-exports only
    "policy": {"client"},
    "broker_client": {"broker.client", "broker.aio"},
}


def _part(module: str) -> str:
    """sockcreator.X.Y -> "X" (a subpackage or a top-level module)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _allowed(target: str, allowed: set[str]) -> bool:
    """``target`` (dotted, under sockcreator) is within one of ``allowed``."""
    rel = target.split(".", 1)[1] if "." in target else "__init__"
    return any(rel == a or rel.startswith(a + ".") for a in allowed)


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1] if len(parts) > 2 else [*parts[:-1], "__init__"]
        out.append((".".join(parts), path))
    return out


def _is_module(dotted: str) -> bool:
    if not dotted.startswith("sockcreator."):
        return False
    rel = Path(*dotted.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def _imports(module: str, path: Path) -> list[tuple[int, str]]:
    """Every module ``module`` imports: (line, absolute dotted name)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    package = module.split(".")
    if not is_pkg:
        package = package[:-1]
    if package[-1] == "__init__":
        package = package[:-1]
    out: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # from X import y: y may be a submodule (then that is what is
            # imported), or a name defined in X
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((node.lineno, sub if _is_module(sub) else target))
    return out


MODULES = _modules()


def test_the_tree_reads_as_the_four_parts() -> None:
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert subpackages == {"client", "run", "broker"}
    assert (PACKAGE / "creator.py").exists()
    for name in subpackages:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text())) or ""
        doc = " ".join(doc.split())
        assert "may import" in doc and "must not" in doc, name


@pytest.mark.parametrize(("module", "path"), MODULES, ids=[m for m, _ in MODULES])
def test_import_rules(module: str, path: Path) -> None:
    part = _part(module)
    assert part in MAY_IMPORT, f"{module}: no rule for part {part!r}"
    allowed = MAY_IMPORT[part]
    for line, target in _imports(module, path):
        top = target.split(".")[0]
        if top != "sockcreator":
            if module == "sockcreator.creator":
                assert top in STDLIB or top.lstrip("_") in STDLIB, f"creator imports {target}"
            continue
        assert target != "sockcreator.creator", f"{path.name}:{line} imports the creator"
        if target == "sockcreator" and part != "__init__":
            raise AssertionError(f"{path.name}:{line}: import the part, not the package")
        assert _allowed(target, allowed), f"{module} (line {line}) may not import {target}"


def test_nothing_in_client_or_run_reaches_broker_internals() -> None:
    for module, path in MODULES:
        if _part(module) in ("client", "run"):
            for line, target in _imports(module, path):
                if target.startswith("sockcreator.broker"):
                    assert target == "sockcreator.broker.client", (module, line, target)


def test_no_module_is_too_large() -> None:
    """About 400 lines at most, unless the module says why (a line in its
    docstring starting with 'Size:')."""
    for module, path in MODULES:
        text = path.read_text()
        doc = ast.get_docstring(ast.parse(text)) or ""
        lines = len(text.splitlines())
        if lines > 450:
            assert "Size:" in doc, f"{module} has {lines} lines and no reason for it"


DOCUMENTED = [
    ("sockcreator", "SocketCreator"),
    ("sockcreator", "AsyncSocketCreator"),
    ("sockcreator", "Broker"),
    ("sockcreator", "AsyncBroker"),
    ("sockcreator", "SocketRefusedError"),
    ("sockcreator", "BrokerFatalError"),
    ("sockcreator", "CreatorError"),
    ("sockcreator", "CreatorFatalError"),
    ("sockcreator", "SocketCreationError"),
    ("sockcreator", "Request"),
    ("sockcreator", "SocketOptions"),
    ("sockcreator", "make_request"),
    ("sockcreator.activation", "listen_fds"),
    ("sockcreator.activation", "listen_sockets"),
    ("sockcreator.privileges", "drop_privileges"),
    ("sockcreator.policy", "parse_listen"),
    ("sockcreator.policy", "parse_rule"),
    ("sockcreator.broker_client", "get_listen_sockets"),
    ("sockcreator.client", "SocketCreator"),
    ("sockcreator.client._protocol", "make_request"),
    ("sockcreator.client._protocol", "AnswerParser"),
    ("sockcreator.cli", "main"),
    ("sockcreator.run.launcher", "main"),
    ("sockcreator.broker.serve", "main"),
]


@pytest.mark.parametrize(("module", "name"), DOCUMENTED)
def test_documented_import_paths(module: str, name: str) -> None:
    assert hasattr(importlib.import_module(module), name)
