"""sockcreator._record.dataclass makes what dataclasses.dataclass(frozen=True)
makes, for the classes this package has (start-up, issue 14): checked side
by side, before and after a class's __init__ is compiled."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import pytest

from sockcreator import _record


def _pair() -> tuple[Any, Any]:
    made = []
    for deco in (dataclasses.dataclass(frozen=True), _record.dataclass(frozen=True)):

        class Point:
            """A point."""

            x: int
            y: str
            z: float | None = None

            def __post_init__(self) -> None:
                if self.x < 0:
                    raise ValueError("negative")

        made.append(deco(Point))
    return made[0], made[1]


CALLS: list[tuple[tuple[Any, ...], dict[str, Any]]] = [
    ((1, "a"), {}), ((1, "a", 2.0), {}), ((1,), {"y": "b"}), ((), {"y": "b", "x": 3, "z": None}),
    ((1, "a", 2.0, 4), {}), ((1,), {}), ((1, "a"), {"x": 2}), ((1, "a"), {"w": 0}), ((-1, "a"), {}),
]  # fmt: skip


def _outcome(cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> object:
    try:
        obj = cls(*args, **kwargs)
    except (TypeError, ValueError) as e:
        return type(e), str(e).replace(cls.__qualname__, "Point")
    return repr(obj), list(vars(obj).items()), hash(obj)


@pytest.mark.parametrize("rounds", [1, _record._HOT + 2])
def test_the_same_instances_and_errors(rounds: int) -> None:
    real, ours = _pair()
    for _ in range(rounds):  # before __init__ is compiled, and after
        for args, kwargs in CALLS:
            assert _outcome(ours, args, kwargs) == _outcome(real, args, kwargs), (args, kwargs)


def test_equality_hashing_freezing_and_the_dataclasses_functions() -> None:
    real, ours = _pair()
    a, b = ours(1, "a"), ours(1, "a")
    assert a == b and hash(a) == hash(b) and a != ours(2, "a") and a != real(1, "a")
    assert (a == (1, "a", None)) is False
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'x'"):
        a.x = 2
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot delete field 'y'"):
        del a.y
    assert dataclasses.is_dataclass(ours) and dataclasses.is_dataclass(a)
    assert [f.name for f in dataclasses.fields(a)] == ["x", "y", "z"]
    assert dataclasses.replace(a, z=1.5) == ours(1, "a", 1.5)
    assert dataclasses.asdict(a) == {"x": 1, "y": "a", "z": None}
    assert ours.__match_args__ == real.__match_args__
    match a:
        case ours(x, y):  # type: ignore[misc]
            assert (x, y) == (1, "a")
    assert ours.__doc__ == "A point."
    assert ours.__init__.__qualname__.endswith("Point.__init__")


def test_instances_pickle() -> None:
    from sockcreator.client._protocol import make_request

    r = make_request("udp", "::1", 53)
    assert pickle.loads(pickle.dumps(r)) == r
