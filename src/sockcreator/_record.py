"""``dataclass(frozen=True)`` without importing :mod:`dataclasses` (issue 14).

``import dataclasses`` imports :mod:`inspect` (and ``ast``, ``dis``,
``tokenize``...): about 10 ms, and each decorated class costs another half
millisecond of generated code; ``sockcreator run`` paid that for some twenty
small value classes before it did anything.  Modules on the command paths
write::

    TYPE_CHECKING = False
    if TYPE_CHECKING:
        from dataclasses import dataclass
    else:
        from .._record import dataclass

so that type checkers see the real decorator, and at run time this one makes
the same class: ``__init__`` (positional or keyword, defaults, then
``__post_init__``), ``__repr__``, ``__eq__`` and ``__hash__`` over the
fields in order, ``__match_args__``, and assignment and deletion raising
:class:`dataclasses.FrozenInstanceError` (imported when raised).  Instances
keep a ``__dict__``, as a dataclass's do (``functools.cached_property``
works).  ``dataclasses.fields``, ``replace``, ``asdict`` and
``is_dataclass`` work too: ``__dataclass_fields__`` is made, by the real
:mod:`dataclasses`, the first time something asks for it.

Only what this package uses is supported: ``frozen=True``, plain defaults
(no ``field()``), no ``ClassVar`` or ``InitVar``, no base with fields.
"""

from __future__ import annotations

TYPE_CHECKING = False  # (not typing's: that import is what this module avoids)
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, TypeVar

    _T = TypeVar("_T", bound=type)

__all__ = ["dataclass"]


def _frozen_error(text: str) -> BaseException:
    from dataclasses import FrozenInstanceError

    return FrozenInstanceError(text)


class _LazyFields:
    """``__dataclass_fields__`` (or ``__dataclass_params__``), made by the
    real module from the same annotations and defaults when first read."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __get__(self, obj: object, cls: type) -> Any:
        import dataclasses

        ns: dict[str, Any] = {"__annotations__": dict(cls.__annotations__)}
        ns.update(__module__=cls.__module__, __qualname__=cls.__qualname__)
        ns.update(cls.__dict__["__record_defaults__"])
        shadow: Any = dataclasses.dataclass(frozen=True)(type(cls.__name__, (), ns))
        for attr in ("__dataclass_fields__", "__dataclass_params__"):
            type.__setattr__(cls, attr, getattr(shadow, attr))
        return getattr(cls, self.attr)


def dataclass(*, frozen: bool) -> Callable[[_T], _T]:
    """The stand-in for ``dataclasses.dataclass(frozen=True)`` (see above)."""
    if not frozen:
        raise TypeError("only frozen dataclasses are supported")
    return _make


def _make(decorated: _T) -> _T:
    cls: Any = decorated
    own = cls.__dict__
    names = tuple(own.get("__annotations__", {}))
    for base in cls.__mro__[1:]:
        if "__record_fields__" in base.__dict__ or "__dataclass_fields__" in base.__dict__:
            raise TypeError(f"{cls.__name__}: a base with fields is not supported")
    defaults = {n: own[n] for n in names if n in own}
    params: list[str] = []
    for n in names:
        if n in defaults:
            params.append(f"{n}=_d_{n}")
        elif params and "=" in params[-1]:
            raise TypeError(f"non-default argument {n!r} follows default argument")
        else:
            params.append(n)
    body = [f"    _set(self, {n!r}, {n})" for n in names]
    if "__post_init__" in own:
        body.append("    self.__post_init__()")
    values = "".join(f"self.{n}," for n in names)
    inner = ", ".join(f"{n}={{self.{n}!r}}" for n in names)
    others = "".join(f"other.{n}," for n in names)
    source = "\n".join(
        [
            f"def __init__(self, {', '.join(params)}) -> None:",
            *(body or ["    pass"]),
            "def __eq__(self, other):",
            "    if other.__class__ is self.__class__:",
            f"        return ({values}) == ({others})",
            "    return NotImplemented",
            "def __hash__(self):",
            f"    return hash(({values}))",
            "def __repr__(self):",
            f"    return f'{{self.__class__.__qualname__}}({inner})'",
        ]
    )
    ns: dict[str, Any] = {f"_d_{n}": v for n, v in defaults.items()}
    ns["_set"] = object.__setattr__
    exec(source, ns)  # one small compile per class: what dataclasses does, less of it
    qual = cls.__qualname__
    fieldset = frozenset(names)

    def __setattr__(self: object, name: str, value: object) -> None:
        if type(self) is cls or name in fieldset:
            raise _frozen_error(f"cannot assign to field {name!r}")
        super(cls, self).__setattr__(name, value)

    def __delattr__(self: object, name: str) -> None:
        if type(self) is cls or name in fieldset:
            raise _frozen_error(f"cannot delete field {name!r}")
        super(cls, self).__delattr__(name)

    methods: dict[str, Any] = {
        "__init__": ns["__init__"],
        "__repr__": ns["__repr__"],
        "__eq__": ns["__eq__"],
        "__hash__": ns["__hash__"],
        "__setattr__": __setattr__,
        "__delattr__": __delattr__,
    }
    for name, fn in methods.items():
        fn.__qualname__ = f"{qual}.{name}"
        if name not in own or (name == "__hash__" and own[name] is None):
            setattr(cls, name, fn)
    for name, value in (
        ("__record_fields__", names),
        ("__record_defaults__", defaults),
        ("__match_args__", names),
        ("__dataclass_fields__", _LazyFields("__dataclass_fields__")),
        ("__dataclass_params__", _LazyFields("__dataclass_params__")),
    ):
        setattr(cls, name, value)
    if cls.__doc__ is None:  # as dataclasses does, from the signature
        sig = ", ".join(
            f"{n}: {own['__annotations__'][n]!r}" + (f" = {defaults[n]!r}" if n in defaults else "")
            for n in names
        )
        cls.__doc__ = f"{cls.__name__}({sig})"
    return decorated
