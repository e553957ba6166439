"""Records read back from JSON by their dataclass fields: the one reader of every evaluator's result, a training
run's summary and a compression record (``from_record``), beside the reader of config tables that the command
line and the study file use (common.cli.from_table).

A field says where its value sits in the record and what it may be with ``figure(...)``; its type says the rest:

    nats: float = figure(low=0.0)                                   # a finite number >= 0 under the field's name
    documents: tuple[DocumentFigures, ...] = figure("per_document", default=())   # another key
    pass_at_1: float | None = figure(("pass", "pass@1"), default=None)           # a key inside a table
    figures: PerplexityFigures = figure(SELF)                       # read from the record itself

``int`` is a count (a whole number >= 0), ``float`` a finite number (within ``low``/``high``; ``infinite`` lets an
unbounded interval's end through), ``str``/``bool``/``dict`` exactly those, a dataclass (or a tuple or a dict of
them) is read the same way, and ``X | None`` also takes null. Keys beyond the fields stay in the record (a result
keeps its examples). A missing key is a KeyError naming it; a bad value a ValueError naming where it sits
(``perplexity.per_document[3].nats = nan is not a finite number in [0.0, inf]``).

Written here rather than with pydantic: these records are plain dataclasses that writers build everywhere, three
of them carry their model's identity and figures at the record's top level (read with ``SELF``), which pydantic
reads of a plain dataclass only through a validator written per class; and its errors list every failure over
several lines where a user needs one line. The rules are the command line's (common.cli), applied to files.
"""

from __future__ import annotations

import dataclasses
import math
import typing

from common.cli import optional_inner, short_repr

SELF = ()  # the key path of the record itself


def figure(key: str | tuple[str, ...] | None = None, *, low=None, high=None, infinite=False, when=None, **field):
    """A dataclass field read from ``key`` (its own name where None; a tuple: a key inside tables; SELF: the
    record itself), within [low, high] where given. ``when``: read only where the record has that key (an optional
    part of a record read from the record itself), else None. ``field``: dataclasses.field's own arguments."""
    meta = {"key": key, "low": low, "high": high, "infinite": infinite, "when": when}
    return dataclasses.field(metadata=meta, **field)


class Record:
    """A dataclass read from a JSON record by ``from_record``: ``Cls.of(d)`` (None for None). A class may bring a
    record written by older code to its current layout with a classmethod ``older(d) -> d``."""

    @classmethod
    def of(cls, d: dict | None, where: str = ""):
        return None if d is None else from_record(cls, d, where)


def from_record(cls, d, where: str = ""):
    """A dataclass ``cls`` from the JSON record ``d`` (``where``: the record's place, for error messages)."""
    if not isinstance(d, dict):
        raise ValueError(f"{where or cls.__name__} = {short_repr(d)} is not a table")
    older = getattr(cls, "older", None)
    if older is not None:
        d = older(d)
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        meta = f.metadata
        key = f.name if meta.get("key") is None else meta["key"]
        path = key if isinstance(key, tuple) else (key,)
        name = ".".join(p for p in (where, *path) if p)
        if meta.get("when") is not None and meta["when"] not in d:
            values[f.name] = None
            continue
        found, v = _lookup(d, path)
        if not found:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise KeyError(v)
            continue
        values[f.name] = _value(v, hints[f.name], name, meta)
    return cls(**values)


def _lookup(d: dict, path: tuple[str, ...]):
    """(True, the value at ``path``) or (False, the first key missing on the way; a null table counts as missing)."""
    for i, k in enumerate(path):
        last = i == len(path) - 1
        if not isinstance(d, dict) or k not in d or (d[k] is None and not last):
            return False, k
        d = d[k]
    return True, d


def _value(v, tp, name: str, meta):
    inner = optional_inner(tp)
    if inner is not None:
        return None if v is None else _value(v, inner, name, meta)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_record(tp, v, name)
    if origin is tuple:
        item = typing.get_args(tp)[0]
        if not isinstance(v, list | tuple):
            raise ValueError(f"{name} = {short_repr(v)} is not a list")
        return tuple(_value(x, item, f"{name}[{i}]", meta) for i, x in enumerate(v))
    if origin is dict or tp is dict:
        if not isinstance(v, dict):
            raise ValueError(f"{name} = {short_repr(v)} is not a table")
        args = typing.get_args(tp)
        return {k: _value(x, args[1], f"{name}.{k}", meta) for k, x in v.items()} if args else v
    if tp is float:
        return _finite(v, name, meta.get("low"), meta.get("high"), meta.get("infinite", False))
    if tp is int:
        return _count(v, name)
    if tp in (str, bool) and not isinstance(v, tp):
        raise ValueError(f"{name} = {short_repr(v)} is not {'a string' if tp is str else 'true or false'}")
    return v


def _finite(v, what: str, low: float | None = None, high: float | None = None, infinite: bool = False) -> float:
    """A figure as a float: a number, finite (or, with ``infinite``, not NaN: an unbounded interval's end), within
    [low, high] where given; else ValueError naming it."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"{what} = {short_repr(v)} is not a number")
    x = float(v)
    bad = math.isnan(x) if infinite else not math.isfinite(x)
    if bad or (low is not None and x < low) or (high is not None and x > high):
        bounds = f" in [{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise ValueError(
            f"{what} = {v!r} is not a finite number{bounds if low is not None or high is not None else ''}"
        )
    return x


def _count(v, what: str) -> int:
    """A count: a whole number, not negative; else ValueError naming it."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{what} = {short_repr(v)} is not a count (a whole number >= 0)")
    return v
