"""Command-line flags generated from config dataclasses: each option's type, default and help are
stated once, on its field (``metadata={"help": …}``), and the flag follows from them.

Field metadata: ``help`` (required for a flag), ``flag`` (default ``--field-name``), ``parse`` (a
callable for types argparse cannot parse, e.g. lists), ``choices`` (narrower than the type's),
``required``, ``cli=False`` (not a flag).
A ``Literal`` type gives ``choices``; a ``bool`` that defaults to True gives ``--no-…`` (its
``flag``); a field whose type is itself a config dataclass contributes that dataclass's flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,4,8; got {text!r}") from e


def targets_arg(text: str) -> list[str] | str:
    """``q_proj,v_proj`` (names) or ``re:<regex>`` (full-match on module paths)."""
    if text.startswith("re:"):
        return text[3:]
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise argparse.ArgumentTypeError("--targets needs module names like q_proj,v_proj or re:<regex>")
    return names


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _unwrap(tp: Any) -> Any:
    """``X | None`` → X (an optional flag is simply omitted)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def literal_choices(tp: Any) -> tuple | None:
    """The values of a ``Literal`` (also inside ``Literal[...] | None``), else None."""
    tp = _unwrap(tp)
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # Literal["auto"] | Literal[...]
        parts = [literal_choices(a) for a in typing.get_args(tp)]
        if all(parts):
            return tuple(v for p in parts for v in p)
    return None


def add_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of ``cls`` (and of config dataclasses it embeds)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, meta = hints[f.name], f.metadata
        if dataclasses.is_dataclass(tp):
            add_flags(parser, tp)
            continue
        if meta.get("cli") is False:
            continue
        default = _default(f)
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        help_text = meta["help"]
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action="store_false" if default else "store_true",
                                help=help_text)
            continue
        kw: dict[str, Any] = {"dest": f.name, "default": default,
                              "metavar": flag.lstrip("-").replace("-", "_").upper()}
        choices = meta.get("choices") or literal_choices(tp)
        if choices:
            kw["choices"] = choices
            kw.pop("metavar")
        kw["type"] = meta.get("parse") or (str if choices else _unwrap(tp))
        if meta.get("required"):
            kw["required"] = True
            kw.pop("default")
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        parser.add_argument(flag, help=f"{help_text}" + ("" if meta.get("required") or default in (None, [])
                                                         else f" (default {shown})"), **kw)


def flag_values(cls: type, namespace: argparse.Namespace) -> dict[str, Any]:
    """``{field: value}`` of ``cls`` read back from parsed flags; an embedded config dataclass
    becomes its own dict (the caller builds it, so that it can collect its errors)."""
    hints = typing.get_type_hints(cls)
    ns = vars(namespace)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = flag_values(hints[f.name], namespace)
        elif f.name in ns:
            out[f.name] = ns[f.name]
    return out


def flag_of(cls: type, name: str) -> str:
    """The flag that sets field ``name`` of ``cls`` (for error messages)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    return f.metadata.get("flag", "--" + name.replace("_", "-"))
