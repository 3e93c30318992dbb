"""Typed sections of YAML files (profiles, manifests): unknown keys and wrong types fail at load time.

A section is a frozen dataclass; :func:`parse_section` builds one from a mapping and names the
file and the key on any problem, so a misspelt ``modalty:`` or ``step:`` never passes silently.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, TypeVar, Union

from .errors import FewsamError

S = TypeVar("S")


def check_keys(raw: Any, allowed: typing.Iterable[str], where: str, error: type[FewsamError] = FewsamError) -> dict:
    """``raw`` as a dict whose keys are all in ``allowed``; else one error naming the first unknown key."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise error(f"{where}: expected a mapping of keys, got {type(raw).__name__} {raw!r}")
    allowed = list(allowed)
    unknown = [str(key) for key in raw if key not in allowed]
    if unknown:
        raise error(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(allowed)})")
    return raw


def check_variant_keys(per_variant: dict[str, Any], variants: typing.Iterable[str], key: str, where: str) -> None:
    """A ``{variant: [...]}`` setting (``variant_seeds``, ``variant_shots``, ``variant_steps``) may name
    only planned variants."""
    variants = list(variants)
    unplanned = [name for name in per_variant if name not in variants]
    if unplanned:
        raise FewsamError(
            f"{where}: {key} names '{unplanned[0]}', which is not one of the variants ({', '.join(variants) or 'none'})"
        )


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin in (list, tuple):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return isinstance(value, (list, tuple)) and all(_matches(v, item) for v in value)
    if origin is dict:
        key, item = typing.get_args(hint) or (Any, Any)
        return isinstance(value, dict) and all(_matches(k, key) and _matches(v, item) for k, v in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "") if not isinstance(hint, type) else hint.__name__


def parse_section(cls: type[S], raw: Any, where: str, error: type[FewsamError] = FewsamError) -> S:
    """An instance of the dataclass ``cls`` from ``raw``; lists become tuples (sections are frozen).

    A section with a ``check_section(where)`` method checks its nested settings there.
    """
    fields = {field.name: field for field in dataclasses.fields(cls) if field.init}
    raw = check_keys(raw, fields, where, error)
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in raw.items():
        if not _matches(value, hints[key]):
            raise error(f"{where}: '{key}' must be {_describe(hints[key])}, got {value!r}")
        values[key] = tuple(value) if isinstance(value, list) else value
    missing = [
        name
        for name, field in fields.items()
        if name not in values and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise error(f"{where}: missing key '{missing[0]}'")
    section = cls(**values)
    if hasattr(section, "check_section"):  # nested settings a section checks itself
        section.check_section(where)
    return section


def _whole_number_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    return _whole_number_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number of at least 0."""
    return _whole_number_at_least(text, 0)
