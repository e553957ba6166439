"""The one command-line layer: every command's options are a typed dataclass, filled from ``--key value``.

    python -m runners.tiny --max-steps 200 --lr 3e-4 --no-head-layer
    python -m eval.perplexity checkpoints/tiny --stride 128
    python -m eval.efficiency checkpoints/tiny --batch-sizes 1 8 --modes eager compile

- ``--key value`` or ``--key=value`` sets the one field of that name anywhere in a nested config; a name
  found in two places needs its path (``--data.vocab-size``). ``-`` and ``_`` are the same.
- Types are checked: ``int``, ``float``, ``str``, ``bool`` (a bare ``--flag`` is true, ``--no-flag`` false),
  ``X | None`` (``none``), ``Literal[...]`` choices and ``list[X]`` (the values up to the next ``--key``).
- ``--no-<field>`` sets an optional nested config (such as ``head_layer``) to None.
- Fields marked ``positional`` are filled, in order, from the arguments that are not ``--key`` pairs.
- ``--help`` lists every key with its type, current value and the comment written next to the field.
- Unknown keys, wrong types and values that fail a config's ``__post_init__`` checks are one-line errors.
- A number option declared with ``ranged(default, low, high)`` is held to that range (NaN is inside none), here
  and in study-file tables, and ``--help`` prints the range beside the option's comment.

Written here rather than taken from tyro or jsonargparse: both prefix nested fields (``--optim.lr`` where
users type ``--lr``) and turn an optional nested dataclass into a subcommand (``head-layer:None`` where
users type ``--no-head-layer``); this layer keeps the commands people already use.
"""

from __future__ import annotations

import dataclasses
import difflib
import errno
import inspect
import re
import sys
import types
import typing


class UserError(ValueError):
    """Bad input (a file, a setting, a request, a folder) that the user can fix: a command prints it as one line
    naming the problem and the fix, and exits 2. A ValueError subclass, so callers that catch ValueError still do."""


class ConfigError(UserError):
    """A command-line option or config field that is unknown, of the wrong type or out of range."""


def positional(default=None, required: bool = True, **kw):
    """A field filled from a bare command-line argument (``python -m eval.perplexity CHECKPOINT``); a
    required one left at None is an error naming it."""
    return _marked({"positional": True, "required": required}, default, **kw)


def _marked(meta: dict, default, **kw) -> dataclasses.Field:
    """A dataclass field carrying ``meta``, with ``default`` unless a ``default_factory`` is given."""
    if "default_factory" in kw:
        return dataclasses.field(metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def ranged(default=None, low: float | None = None, high: float | None = None, above: bool = False, **kw):
    """A number option the command line checks (each value of a list): at least ``low`` (above it where
    ``above``) and at most ``high``; None passes where the type allows it. A value out of range is a one-line
    ConfigError naming the option, the range and the default, before any work starts."""
    return _marked({"range": (low, high, above)}, default, **kw)


def _check_range(f: dataclasses.Field, value, name: str) -> None:
    if "range" not in f.metadata or value is None:
        return
    low, high, above = f.metadata["range"]
    for v in value if isinstance(value, (list, tuple)) else [value]:
        inside = (low is None or (v > low if above else v >= low)) and (high is None or v <= high)
        if not inside:  # written so that NaN, never inside any range, is refused too
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            fix = "leave it out for the default" + ("" if default is None else f", {default!r}")
            raise ConfigError(f"{name} {v!r}: must be {_range_text(f)} ({fix})")


def _range_text(f: dataclasses.Field) -> str:
    """A ranged field's range in words ("at least 1", "above 0 and at most 1"); "" for any other field."""
    low, high, above = f.metadata.get("range", (None, None, False))
    words = [f"{'above' if above else 'at least'} {low:g}"] if low is not None else []
    return " and ".join(words + ([f"at most {high:g}"] if high is not None else []))


def _field_paths(cfg, prefix: str = "", derived: tuple = ()) -> dict[str, tuple[object, dataclasses.Field, object]]:
    """Every leaf field of a nested dataclass config: dotted path -> (owner, field, resolved type). An
    optional nested config (``X | None`` holding an X) is a node; its path itself maps to the field too.
    Paths a config lists in its ``DERIVED`` class attribute are computed from others and are not options."""
    out = {}
    hints = typing.get_type_hints(type(cfg))
    derived = derived + tuple(prefix + p for p in getattr(type(cfg), "DERIVED", ()))
    for f in dataclasses.fields(cfg):
        if not f.init or prefix + f.name in derived:
            continue
        value = getattr(cfg, f.name)
        path = prefix + f.name
        if dataclasses.is_dataclass(value):
            out.update(_field_paths(value, path + ".", derived))
            if type(None) in typing.get_args(hints[f.name]):
                out[path] = (cfg, f, hints[f.name])  # for --no-<field>
        else:
            out[path] = (cfg, f, hints[f.name])
    return out


def _scalar(text: str, tp, key: str):
    if tp is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key} expects true or false, got {text!r}")
    if typing.get_origin(tp) is typing.Literal:
        choices = typing.get_args(tp)
        for c in choices:
            if text == str(c):
                return c
        raise ConfigError(f"--{key} must be one of {', '.join(map(str, choices))}; got {text!r}")
    if tp in (int, float, str):
        try:
            return tp(text)
        except ValueError:
            raise ConfigError(f"--{key} expects {tp.__name__}, got {text!r}") from None
    raise ConfigError(f"--{key} has type {tp} that cannot be set from the command line; set it in the runner")


def optional_inner(tp):
    """X of a type hint ``X | None`` (None for any other hint)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1 and type(None) in typing.get_args(tp):
            return inner[0]
    return None


def _is_list(tp) -> bool:
    inner = optional_inner(tp)
    return typing.get_origin(inner if inner is not None else tp) is list


def _parse(values: list[str], tp, key: str):
    inner = optional_inner(tp)
    if inner is not None:
        if len(values) == 1 and values[0].lower() in ("none", "null"):
            return None
        return _parse(values, inner, key)
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return [_scalar(v, item, key) for v in values]
    if len(values) != 1:
        raise ConfigError(f"--{key} takes one value, got {values}")
    return _scalar(values[0], tp, key)


def apply_overrides(cfg, argv: list[str], given: dict[str, str] | None = None):
    """Fill the (nested) dataclass ``cfg`` from ``argv`` in place, check it, and return it; ``given``, where passed,
    receives each dotted field path the command line set (or removed) and the option as it was spelled."""
    paths = _field_paths(cfg)
    if "--help" in argv or "-h" in argv:
        print(overrides_help(cfg, paths))
        raise SystemExit(0)
    by_name = _by_name(paths)
    slots = [p for p, (_, f, _) in paths.items() if f.metadata.get("positional")]
    bare: list[str] = []
    removed, set_paths = {}, {}  # --no-<part> and --key paths given, to refuse a key of a part removed
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            bare.append(arg)
            i += 1
            continue
        raw, eq, value = arg[2:].partition("=")
        key = raw.replace("-", "_")
        negated = False
        path = _resolve(key, by_name, paths, raw)
        if path is None and key.startswith("no_"):
            path, negated = _resolve(key[3:], by_name, paths, raw), True
        if path is None:
            shown = [_shown(p, by_name) for p in paths]
            close = difflib.get_close_matches("--" + raw.replace("_", "-"), shown, n=3, cutoff=0.6)
            if close:
                raise ConfigError(f"unknown config key --{raw}; did you mean {' or '.join(close)}? (--help lists all)")
            raise ConfigError(f"unknown config key --{raw}; --help lists the {len(shown)} options")
        owner, f, tp = paths[path]
        if negated:
            if not (tp is bool or optional_inner(tp) is not None) or eq:
                raise ConfigError(f"--{raw}: only a true/false option or an optional part can be negated")
            setattr(owner, f.name, False if tp is bool else None)
            if given is not None:
                given[path] = raw
            if tp is not bool:
                removed[path] = raw
            i += 1
            continue
        if eq:
            values = [value]
        else:
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--") and (j == i + 1 or _is_list(tp)):
                j += 1
            values = argv[i + 1 : j]
            if not values and tp is bool:
                values = ["true"]
            if not values:
                raise ConfigError(f"--{raw} needs a value")
            i = j - 1
        setattr(owner, f.name, _parse(values, tp, raw))
        _check_range(f, getattr(owner, f.name), f"--{raw}")
        set_paths[path] = raw
        if given is not None:
            given[path] = raw
        i += 1
    for part, no in removed.items():  # its fields were set on a part that no longer exists: silently lost
        lost = [k for p, k in set_paths.items() if p.startswith(part + ".")]
        if lost:
            raise ConfigError(f"--{lost[0]} sets a field of {part}, which --{no} removes; pass one of the two")
    _fill_positional(cfg, paths, slots, bare)
    _revalidate(cfg)
    return cfg


def _by_name(paths: dict) -> dict[str, list[str]]:
    """Field name -> the dotted paths that end in it (more than one: the name needs its path)."""
    out: dict[str, list[str]] = {}
    for path in paths:
        out.setdefault(path.rsplit(".", 1)[-1], []).append(path)
    return out


def _resolve(key: str, by_name: dict, paths: dict, raw: str) -> str | None:
    if key in paths:
        return key
    found = by_name.get(key, [])
    if len(found) > 1:
        raise ConfigError(f"--{raw} is ambiguous; name one of: " + ", ".join("--" + p for p in found))
    return found[0] if found else None


def _shown(path: str, by_name: dict) -> str:
    name = path.rsplit(".", 1)[-1]
    return "--" + (name if len(by_name[name]) == 1 else path).replace("_", "-")


def _fill_positional(cfg, paths: dict, slots: list[str], bare: list[str]):
    for k, path in enumerate(slots):
        owner, f, tp = paths[path]
        if _is_list(tp):  # a list takes what is left
            setattr(owner, f.name, _parse(bare, tp, f.name) if bare else [])
            bare = []
        elif bare:
            setattr(owner, f.name, _parse([bare.pop(0)], tp, f.name))
        elif getattr(owner, f.name) is None and f.metadata.get("required"):
            names = " ".join(s.rsplit(".", 1)[-1].upper() for s in slots[k:])
            raise ConfigError(f"missing {names}; see --help")
    if bare:
        raise ConfigError(f"unexpected argument {bare[0]!r}; options look like --max-steps 200 (see --help)")


def _comments(cls) -> dict[str, str]:
    """The comment written after each field in the class body: what ``--help`` shows for it."""
    out = {}
    for klass in reversed(cls.__mro__):
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):
            continue
        for line in lines:
            m = re.match(r"^\s+(\w+)\s*:[^#]*#\s*(.+)$", line)
            if m:
                out[m.group(1)] = m.group(2).strip()
    return out


def overrides_help(cfg, paths: dict | None = None) -> str:
    paths = paths or _field_paths(cfg)
    by_name = _by_name(paths)
    module = _command_module(cfg)
    doc = (inspect.getdoc(module) or "").strip()
    name = module.__spec__.name.removesuffix(".__main__") if getattr(module, "__spec__", None) else "<command>"
    lines = [f"usage: python -m {name} [options]", ""]
    if doc:
        lines += [doc, ""]
    lines.append("options (a name found in two places needs its path):")
    comments: dict[int, dict[str, str]] = {}
    for path, (owner, f, tp) in paths.items():
        note = comments.setdefault(id(type(owner)), _comments(type(owner))).get(f.name, "")
        tname = re.sub(r"typing\.|<class '|'>", "", str(tp) if not isinstance(tp, type) else tp.__name__)
        value = getattr(owner, f.name)
        shown = f.name.upper() if f.metadata.get("positional") else _shown(path, by_name)
        now = "" if dataclasses.is_dataclass(value) else f" = {value!r}"
        note = "; ".join(x for x in (note, _range_text(f)) if x)
        lines.append(f"  {shown:<30} {tname}{now}" + (f"  # {note}" if note else ""))
    return "\n".join(lines)


def _command_module(cfg):
    """The command whose options these are: the options class's own module when it is a command (it has a
    ``main``), else the module run with ``python -m`` (a runner filling a TrainConfig)."""
    own = sys.modules.get(type(cfg).__module__)
    return own if hasattr(own, "main") else sys.modules.get("__main__")


def _revalidate(cfg):
    """Run __post_init__ checks again on every dataclass whose fields may have changed."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _revalidate(value)
    post = getattr(cfg, "__post_init__", None)
    if post is not None:
        post()


def from_table(cls, table, where: str):
    """A dataclass ``cls`` from a TOML/JSON table, checked as the command line is: an unknown key, a missing
    required one or a value of the wrong type (a string where a list belongs, ``true`` where a number does)
    is a one-line ConfigError naming ``where`` and the key. A field whose type is a dataclass (or a list of
    them) is read from its own table the same way, named ``where key`` (``where key #i``)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table of keys, got {table!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; the keys are {', '.join(fields)}")
    required = [
        n
        for n, f in fields.items()
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and n not in table
    ]
    if required:
        raise ConfigError(f"{where}: missing {', '.join(required)}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in table.items():
        tp = optional_inner(hints[key]) or hints[key]  # a table of an optional dataclass is read as one
        item = typing.get_args(tp)[0] if typing.get_origin(tp) is list else None
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            values[key] = from_table(tp, value, f"{where} {key}")
        elif dataclasses.is_dataclass(item) and isinstance(value, list):
            values[key] = [from_table(item, v, f"{where} {key} #{i + 1}") for i, v in enumerate(value)]
        elif not _has_type(value, hints[key]):
            raise ConfigError(f"{where}: {key} = {short_repr(value)} is not {_type_name(hints[key])}")
        else:
            _check_range(fields[key], value, f"{where}: {key} =")
            values[key] = value
    return cls(**values)


def short_repr(value) -> str:
    """A value as its repr, cut to 80 characters: what a one-line error quotes."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _has_type(value, tp) -> bool:
    inner = optional_inner(tp)
    if inner is not None:
        return value is None or _has_type(value, inner)
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if typing.get_origin(tp) is dict:
        return isinstance(value, dict)
    if tp is float:
        return type(value) in (int, float)
    return type(value) is tp  # exact: a bool is not an int here, as TOML's true is not 1


_TYPE_NAMES = {int: ("a whole number", "whole numbers"), float: ("a number", "numbers"), str: ("a string", "strings")}


def _type_name(tp) -> str:
    inner = optional_inner(tp)
    if inner is not None:
        return _type_name(inner) + " or nothing"
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        example = ', e.g. ["--max-steps", "4"]' if item is str else ""
        if dataclasses.is_dataclass(item):
            return f"a list of tables ({item.__name__})"
        return f"a list of {_TYPE_NAMES.get(item, (None, str(item)))[1]}{example}"
    if tp is bool:
        return "true or false"
    return _TYPE_NAMES.get(tp, (str(tp),))[0]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def failure(e: BaseException, limit: int = 300) -> str:
    """An exception as a one-line record of why something was not done (an engine, a variant): its type and
    the first line of its message, or the type alone when it has none."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


# Log lines of libraries that say nothing a user of this project can act on: torchao's kernels built for other
# GPUs failing to load on this machine (it is imported by transformers whenever it is installed), torchao's use
# of a torch API that torch has deprecated, and torch's ONNX exporter noting that torchvision (whose operators
# these models never use) is absent. Only these exact messages are dropped; every other warning still shows.
KNOWN_NOISE = {
    "torchao": ("Failed to load",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
    "torch.onnx._internal.exporter._registration": ("torchvision is not installed",),
}


def silence_known_noise():
    import logging

    class KnownNoise(logging.Filter):
        def __init__(self, phrases: tuple[str, ...]):
            super().__init__()
            self.phrases = phrases

        def filter(self, record: logging.LogRecord) -> bool:
            return not any(p in record.getMessage() for p in self.phrases)

    for name, phrases in KNOWN_NOISE.items():
        logger = logging.getLogger(name)
        if not any(type(f).__name__ == "KnownNoise" for f in logger.filters):
            logger.addFilter(KnownNoise(phrases))


def run_main(main, *args):
    """Run a command's ``main``; the errors our checks raise for bad input (UserError, a missing or existing
    file, a non-finite loss) print as one line (no traceback) and exit 2. Any other exception, a ValueError
    included, is a bug and keeps its traceback."""
    silence_known_noise()
    try:
        return main(*args)
    except (UserError, FileNotFoundError, FileExistsError, NotADirectoryError, FloatingPointError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(
            f"error: the disk is full ({e.strerror}: {e.filename or 'while writing'}); nothing finished was lost: "
            "free some space, then run the same command again (training: with --resume)",
            file=sys.stderr,
        )
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)


def parse_args(options, argv: list[str] | None = None):
    """A command's options dataclass filled from ``argv`` (default: the command line)."""
    return apply_overrides(options, sys.argv[1:] if argv is None else argv)
