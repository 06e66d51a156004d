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

Each method is generated source, as dataclasses makes it, but compiled
only when first called (a compile is a tenth to a fifth of a millisecond);
``__init__`` binds its arguments by hand for a class's first few instances
and is compiled once the class is hot, so that start-up compiles nothing.

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
    seen_default = False
    for n in names:
        if n in defaults:
            seen_default = True
        elif seen_default:
            raise TypeError(f"non-default argument {n!r} follows default argument")
    fieldset = frozenset(names)

    def __setattr__(self: object, name: str, value: object) -> None:
        if type(self) is cls or name in fieldset:
            raise _frozen_error(f"cannot assign to field {name!r}")
        super(cls, self).__setattr__(name, value)

    def __delattr__(self: object, name: str) -> None:
        if type(self) is cls or name in fieldset:
            raise _frozen_error(f"cannot delete field {name!r}")
        super(cls, self).__delattr__(name)

    for name, value in (
        ("__record_fields__", names),
        ("__record_defaults__", defaults),
        ("__match_args__", names),
        ("__dataclass_fields__", _LazyFields("__dataclass_fields__")),
        ("__dataclass_params__", _LazyFields("__dataclass_params__")),
    ):
        setattr(cls, name, value)
    methods: dict[str, Any] = {"__setattr__": __setattr__, "__delattr__": __delattr__}
    for name in _SOURCES:
        methods[name] = _stub(cls, name)
    for name, fn in methods.items():
        fn.__qualname__ = f"{cls.__qualname__}.{name}"
        if name not in own or (name == "__hash__" and own[name] is None):
            setattr(cls, name, fn)
    if cls.__doc__ is None:  # as dataclasses does, from the signature
        sig = ", ".join(
            f"{n}: {own['__annotations__'][n]!r}" + (f" = {defaults[n]!r}" if n in defaults else "")
            for n in names
        )
        cls.__doc__ = f"{cls.__name__}({sig})"
    return decorated


def _init_source(cls: Any, names: tuple[str, ...]) -> list[str]:
    defaults = cls.__dict__["__record_defaults__"]
    params = ", ".join(f"{n}=_d_{n}" if n in defaults else n for n in names)
    body = [f"    _set(self, {n!r}, {n})" for n in names]
    if "__post_init__" in cls.__dict__:
        body.append("    self.__post_init__()")
    return [f"def __init__(self, {params}):", *(body or ["    pass"])]


def _eq_source(cls: Any, names: tuple[str, ...]) -> list[str]:
    mine, theirs = ("".join(f"{who}.{n}," for n in names) for who in ("self", "other"))
    return [
        "def __eq__(self, other):",
        "    if other.__class__ is self.__class__:",
        f"        return ({mine}) == ({theirs})",
        "    return NotImplemented",
    ]


def _hash_source(cls: Any, names: tuple[str, ...]) -> list[str]:
    return ["def __hash__(self):", f"    return hash(({''.join(f'self.{n},' for n in names)}))"]


def _repr_source(cls: Any, names: tuple[str, ...]) -> list[str]:
    inner = ", ".join(f"{n}={{self.{n}!r}}" for n in names)
    return ["def __repr__(self):", f"    return f'{{self.__class__.__qualname__}}({inner})'"]


_SOURCES = {
    "__init__": _init_source,
    "__eq__": _eq_source,
    "__hash__": _hash_source,
    "__repr__": _repr_source,
}


def _stub(cls: Any, name: str) -> Any:
    """``name``, compiled when first called (a compile costs a fifth of a
    millisecond, and most classes never see most of their methods in one
    process); the compiled method then replaces this one.  ``__init__`` is
    compiled only once it is hot: see :func:`_first_inits`."""
    if name == "__init__":
        return _first_inits(cls)

    def stub(self: object, *args: object, **kwargs: object) -> Any:
        return _promote(cls, name, stub)(self, *args, **kwargs)

    return stub


def _promote(cls: Any, name: str, stub: object) -> Any:
    fn = _compile(cls, name)
    if cls.__dict__.get(name) is stub:
        setattr(cls, name, fn)
    return fn


#: Calls of a class's ``__init__`` before it is compiled: start-up makes a
#: handful of each class, a loop makes many.
_HOT = 8


def _first_inits(cls: Any) -> Any:
    """An ``__init__`` that binds its arguments by hand (no compile) for the
    first few instances, then compiles the real one and hands over to it.
    Anything it does not bind plainly (a wrong call, to be explained) goes
    to the compiled one at once, so the errors are its TypeErrors."""
    names = cls.__dict__["__record_fields__"]
    defaults = cls.__dict__["__record_defaults__"]
    fieldset = frozenset(names)
    post = "__post_init__" in cls.__dict__
    calls = 0

    def __init__(self: object, *args: object, **kwargs: object) -> None:
        nonlocal calls
        calls += 1
        values = _bind(args, kwargs) if calls <= _HOT else None
        if values is None:
            _promote(cls, "__init__", __init__)(self, *args, **kwargs)
            return
        for n in names:  # in field order, as the compiled one does
            object.__setattr__(self, n, values[n])
        if post:
            self.__post_init__()  # type: ignore[attr-defined]

    def _bind(args: tuple[object, ...], kwargs: dict[str, object]) -> dict[str, object] | None:
        if len(args) > len(names) or not kwargs.keys() <= fieldset:
            return None
        values = dict(zip(names, args, strict=False))
        if kwargs:
            if not values.keys().isdisjoint(kwargs):
                return None
            values.update(kwargs)
        if len(values) < len(names):
            for n in names:
                if n not in values:
                    if n not in defaults:
                        return None
                    values[n] = defaults[n]
        return values

    return __init__


def _compile(cls: Any, name: str) -> Any:
    names = cls.__dict__["__record_fields__"]
    ns: dict[str, Any] = {f"_d_{n}": v for n, v in cls.__dict__["__record_defaults__"].items()}
    ns["_set"] = object.__setattr__
    exec("\n".join(_SOURCES[name](cls, names)), ns)  # what dataclasses does, when needed
    fn = ns[name]
    fn.__qualname__ = f"{cls.__qualname__}.{name}"
    fn.__module__ = cls.__module__
    return fn
