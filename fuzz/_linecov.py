"""Line coverage of chosen functions while replaying a corpus (no dependencies).

``replay(run, paths, functions)`` feeds every input file (or every file in a
directory) to ``run`` under a line tracer and returns
``{"inputs", "lines_reached", "lines_total", "missed"}`` for the bodies of
``functions`` (plain functions, methods, or properties).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from types import CodeType
from typing import Any

__all__ = ["replay"]


def _code(obj: Any) -> CodeType | None:
    obj = getattr(obj, "fget", obj)
    return getattr(obj, "__code__", None)


def _body_lines(code: CodeType) -> set[int]:
    lines = {ln for _, _, ln in code.co_lines() if ln and ln != code.co_firstlineno}
    for const in code.co_consts:
        if isinstance(const, CodeType):
            lines |= _body_lines(const)
    return lines


def replay(
    run: Callable[[bytes], None], paths: Iterable[str], functions: Iterable[Any]
) -> dict[str, Any]:
    codes = [c for c in map(_code, functions) if c is not None]
    files = {c.co_filename for c in codes}
    wanted: set[tuple[str, int]] = {(c.co_filename, ln) for c in codes for ln in _body_lines(c)}
    hit: set[tuple[str, int]] = set()

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if frame.f_code.co_filename not in files:
            return None

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "line":
                hit.add((frame.f_code.co_filename, frame.f_lineno))
            return local

        return local

    inputs = []
    for p in paths:
        inputs += [os.path.join(p, n) for n in sorted(os.listdir(p))] if os.path.isdir(p) else [p]
    sys.settrace(tracer)
    try:
        for name in inputs:
            with open(name, "rb") as f:
                data = f.read()
            try:
                run(data)
            except Exception as e:  # a crash input: report, go on
                print(f"{name}: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        sys.settrace(None)
    return {
        "inputs": len(inputs),
        "lines_reached": len(wanted & hit),
        "lines_total": len(wanted),
        "missed": sorted(ln for _, ln in wanted - hit),
    }
