"""Settings files: a TOML file whose keys are a frozen dataclass's fields, with flags on top.

Both command lines (``edgetune-aggregator serve --config``, ``edgetune device run --config``)
build their settings here, once, from three layers: the dataclass's defaults, then the file,
then the flags the user actually gave (their argparse defaults are None, so a flag that was not
given cannot hide the file). The walk follows the dataclasses' type hints, as the wire codec
does (``wire/codec.py``), so a new field needs no loader code:

- a nested dataclass is a table; a table overlays the field's default (the daemon's FedAvgM
  server optimizer stays FedAvgM when the table sets only ``lr``);
- a union of dataclasses (``LoraSpec | PromptSpec``) is told apart by the table's ``kind``;
- ``tuple``/``frozenset`` are arrays, ``dict`` a table, ``Path`` a string (``~`` expanded, a
  relative path taken from the file's folder);
- ``bool``, ``int``, ``float`` and ``str`` are checked strictly (``true`` is not an integer; an
  integer is a fine float);
- TOML has no null: an optional field is set to None with the string ``"none"``.

Every mistake is a ``ValueError`` naming the file, the field and what was expected; a failing
``__post_init__`` check gets the file's name in front. Keys this version does not know (from a
newer edgetune) are logged and ignored, not fatal.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["FlagMap", "SettingsFile", "default_of", "flags_given", "read_toml"]

#: how a flag becomes a field: (argparse dest, dotted field path, conversion or None)
FlagMap = Sequence[tuple[str, str, "Callable[[Any], Any] | None"]]


def read_toml(path: Path) -> dict[str, Any]:
    """The file's tables as dicts; an unreadable or malformed file is one line saying so."""
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML: {exc}") from None


def flags_given(args: argparse.Namespace, flags: FlagMap) -> dict[str, Any]:
    """``{field path: value}`` of the flags the user gave (those not None), converted."""
    given = {}
    for dest, path, convert in flags:
        value = getattr(args, dest, None)
        if value is not None:
            given[path] = convert(value) if convert else value
    return given


def default_of(cls: type, path: str) -> Any:
    """The default of a dotted field path (``"train.local_steps"``), for help texts that must
    not drift from the dataclass."""
    value: Any = cls
    for name in path.split("."):
        if isinstance(value, type):  # (the top level: a class, not an instance)
            value = _field_default({f.name: f for f in dataclasses.fields(value)}[name])
            if value is dataclasses.MISSING:
                raise KeyError(f"{cls.__name__}.{path} has no default")
        else:
            value = getattr(value, name)
    return value


class SettingsFile:
    """One settings file (or none) with the command line's flags laid over it."""

    def __init__(self, path: Path | None = None):
        self.path = path
        self.data: dict[str, Any] = read_toml(path) if path is not None else {}
        #: field paths that a flag set
        self.flagged: set[str] = set()

    def override(self, flags: Mapping[str, Any]) -> None:
        """Lay ``{dotted path: value}`` over the file's values (tables made as needed)."""
        for path, value in flags.items():
            *tables, key = path.split(".")
            table = self.data
            for name in tables:
                inner = table.get(name)
                if not isinstance(inner, dict):
                    inner = table[name] = {}
                table = inner
            table[key] = value
            self.flagged.add(path)

    def get(self, path: str, default: Any = None) -> Any:
        value: Any = self.data
        for name in path.split("."):
            if not isinstance(value, dict) or name not in value:
                return default
            value = value[name]
        return value

    def require(self, needed: Iterable[tuple[str, str]]) -> None:
        """Raise, naming both ways to give them, unless each ``(field path, flag)`` was given
        by the file or the flag."""
        missing = [(path, flag) for path, flag in needed if self.get(path) is None]
        if missing:
            flags = [flag for _, flag in missing]
            keys = ", ".join(f"[{p.rsplit('.', 1)[0]}] {p.rsplit('.', 1)[1]}" if "." in p else p for p, _ in missing)
            names = flags[0] if len(flags) == 1 else f"{', '.join(flags[:-1])} and {flags[-1]}"
            one = len(flags) == 1
            raise ValueError(f"{names} {'is' if one else 'are'} required: give {'it as a flag' if one else 'them as flags'}, "
                             f"or in the --config file ({keys})")

    def build(self, cls: type, table: str | None = None, skip: Iterable[str] = ()) -> Any:
        """``cls`` from the top level (or ``[table]``), leaving out the keys in ``skip``
        (tables that another dataclass reads)."""
        data = self.get(table, {}) if table else self.data
        where = table or ""
        if not isinstance(data, dict):
            raise ValueError(f"{self._prefix()}{table} must be a table, got {data!r}")
        skipped = set(skip)
        data = {k: v for k, v in data.items() if k not in skipped}
        return _Builder(self).dataclass(cls, data, where, base={})

    def _prefix(self) -> str:
        """``fleet.toml: `` before a message (nothing without a file: flags alone are checked
        by argparse, and a dataclass's own message names the field)."""
        return "" if self.path is None else f"{self.path}: "


def _field_default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _rebuild_args(instance: Any) -> dict[str, Any]:
    """The fewest arguments that rebuild ``instance``: what a table is laid over. A field its
    ``__post_init__`` derives from others (a server optimizer's momentum, from its name) is
    left out, so that changing the others derives it again."""
    cls = type(instance)
    args = {f.name: getattr(instance, f.name) for f in dataclasses.fields(cls)
            if f.init and getattr(instance, f.name) != _field_default(f)}
    for name in list(args):
        trial = {k: v for k, v in args.items() if k != name}
        try:
            if cls(**trial) == instance:
                args = trial
        except (TypeError, ValueError):
            pass
    return args


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _Builder:
    """One walk of the type hints over the merged values."""

    def __init__(self, source: SettingsFile):
        self.source = source
        self.base_dir = source.path.parent if source.path is not None else None

    def fail(self, path: str, message: str) -> typing.NoReturn:
        raise ValueError(f"{self.source._prefix()}{path} {message}")

    def dataclass(self, cls: type, data: Any, where: str, base: Mapping[str, Any]) -> Any:
        if isinstance(data, cls):  # a default (or a value a flag built) is already one
            return data
        if not isinstance(data, dict):
            self.fail(where, f"must be a table, got {_shown(data)}")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        file = self.source.path or "the command line"
        for key in data:
            if key not in fields:
                table = f"[{where}] of {file}" if where else f"{file}"
                log.warning("unknown key %r in %s (from a newer edgetune?): ignored", key, table)
        kwargs = {}
        for name, field in fields.items():
            path = f"{where}.{name}" if where else name
            if name in data:
                kwargs[name] = self.value(hints[name], data[name], path, _field_default(field))
            elif name in base:
                kwargs[name] = base[name]
            elif _field_default(field) is dataclasses.MISSING:
                self.fail(path, "is required")
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{self.source._prefix()}{f'[{where}]: ' if where else ''}{exc}") from None

    def value(self, tp: Any, value: Any, path: str, default: Any = dataclasses.MISSING) -> Any:
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            options = [t for t in typing.get_args(tp) if t is not type(None)]
            if len(options) < len(typing.get_args(tp)) and (
                    value is None or (value == "none" and path not in self.source.flagged)):  # (a flag's "none" is a name)
                return None
            if len(options) == 1:
                return self.value(options[0], value, path, default)
            return self.tagged(tuple(options), value, path, default)
        if dataclasses.is_dataclass(tp):
            base = _rebuild_args(default) if type(default) is tp else {}
            return self.dataclass(tp, value, path, base)
        if isinstance(tp, type) and issubclass(tp, Enum):
            for member in tp:
                if value == member.value or value is member:
                    return member
            self.fail(path, f"must be one of {', '.join(repr(m.value) for m in tp)}, got {_shown(value)}")
        if tp is Path:
            if isinstance(value, Path):  # from a flag: relative to where the command runs
                return value
            if type(value) is not str:
                self.fail(path, f"must be a path (a string), got {_shown(value)}")
            found = Path(value).expanduser()
            return found if found.is_absolute() or self.base_dir is None else self.base_dir / found
        if tp in _SCALARS:
            check, expected = _SCALARS[tp]
            if not check(value):
                self.fail(path, f"must be {expected}, got {_shown(value)}")
            return float(value) if tp is float else value
        if origin is tuple:
            items = self.array(value, path)
            args = typing.get_args(tp)
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(self.value(args[0], x, f"{path}[{i}]") for i, x in enumerate(items))
            if len(items) != len(args):
                self.fail(path, f"must have {len(args)} items, got {len(items)}")
            return tuple(self.value(t, x, f"{path}[{i}]") for i, (t, x) in enumerate(zip(args, items)))
        if origin is frozenset:
            (item,) = typing.get_args(tp)
            return frozenset(self.value(item, x, f"{path}[{i}]") for i, x in enumerate(self.array(value, path)))
        if origin is dict:
            key_type, value_type = typing.get_args(tp)
            if not isinstance(value, dict):
                self.fail(path, f"must be a table, got {_shown(value)}")
            return {self.value(key_type, k, f"{path} key"): self.value(value_type, v, f"{path}.{k}")
                    for k, v in value.items()}
        raise TypeError(f"{path}: type {tp!r} cannot be read from a settings file")  # programming error

    def array(self, value: Any, path: str) -> list:
        if not isinstance(value, (list, tuple, set, frozenset)):
            self.fail(path, f"must be an array, got {_shown(value)}")
        return list(value)

    def tagged(self, options: tuple[type, ...], value: Any, path: str, default: Any) -> Any:
        """A union of dataclasses told apart by ``kind`` (``LoraSpec | PromptSpec``). A table
        without ``kind`` is of the default's kind (else the first option's)."""
        by_kind = {}
        for cls in options:
            kind = {f.name: f.default for f in dataclasses.fields(cls)}.get("kind")
            if not isinstance(kind, str):
                raise TypeError(f"union member {cls!r} needs a str field 'kind' with a default")  # programming error
            by_kind[kind] = cls
        if isinstance(value, options):
            return value
        if not isinstance(value, dict):
            self.fail(path, f"must be a table, got {_shown(value)}")
        implied = default.kind if type(default) in options else next(iter(by_kind))
        kind = value.get("kind", implied)
        if not isinstance(kind, str) or kind not in by_kind:
            self.fail(f"{path}.kind", f"must be one of {', '.join(map(repr, by_kind))}, got {_shown(kind)}")
        return self.value(by_kind[kind], value, path, default)


def _is_int(v: Any) -> bool:
    return type(v) is int


_SCALARS: dict[type, tuple[Callable[[Any], bool], str]] = {
    bool: (lambda v: type(v) is bool, "true or false"),
    int: (_is_int, "an integer"),
    float: (lambda v: type(v) in (int, float), "a number"),
    str: (lambda v: type(v) is str, "a string"),
}
