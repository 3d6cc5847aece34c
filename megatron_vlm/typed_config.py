"""YAML mappings checked against typed dataclasses: the one validator of stage recipes
(``training/recipe.py``) and model configs (``models/config.py``).

Unknown keys are rejected with a did-you-mean, missing required keys and wrong types are named by
their dotted key, values with a fixed set of choices are checked; every message starts with the
file (``source``) and is raised as the caller's error class.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import Any, List, Mapping, Optional, Type


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _is_instance(value: Any, tp) -> bool:
    if tp is int and isinstance(value, bool):
        return False
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return True
    return isinstance(value, tp)


def coerce(value: Any, tp, where: str, source: str, error: Type[Exception],
           choices: Optional[Mapping[str, tuple]] = None):
    """``value`` checked against the annotation ``tp`` (ints are floats where a float is wanted;
    YAML 1.1's "1e-4" strings too); dataclasses are built with :func:`build`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # Optional[X]
            return coerce(value, options[0], where, source, error, choices)
        for option in options:
            if _is_instance(value, option):
                return coerce(value, option, where, source, error, choices)
        raise error(f"{source}: {where}: expected {' or '.join(map(_type_name, options))}, got "
                    f"{type(value).__name__} {value!r}")
    if origin in (list, List):
        if not isinstance(value, list):
            raise error(f"{source}: {where}: expected a list, got {type(value).__name__}")
        return [coerce(v, args[0], f"{where}[{i}]", source, error, choices)
                for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where, source, error, choices)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-4" (no dot) as a string; users mean a number
            return float(value)
        except ValueError:
            pass
    if not _is_instance(value, tp):
        raise error(f"{source}: {where}: expected {_type_name(tp)}, got "
                    f"{type(value).__name__} {value!r}")
    return value


def build(cls, raw, where: str, source: str, error: Type[Exception],
          choices: Optional[Mapping[str, tuple]] = None, top: str = "top level"):
    """An instance of the dataclass ``cls`` from the mapping ``raw`` (dotted key prefix ``where``).

    ``choices`` maps dotted keys to their allowed values; ``top`` names the whole mapping."""
    choices = choices or {}
    if not isinstance(raw, dict):
        raise error(f"{source}: {where or top}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if not isinstance(key, str):
            raise error(f"{source}: {where or top}: key {key!r} is not a name")
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise error(f"{source}: unknown key {'.'.join(filter(None, [where, key]))!r}{hint}")
    kwargs = {}
    for name, f in fields.items():
        dotted = ".".join(filter(None, [where, name]))
        if name in raw:
            kwargs[name] = coerce(raw[name], hints[name], dotted, source, error, choices)
            if dotted in choices and kwargs[name] not in choices[dotted]:
                raise error(f"{source}: {dotted}: must be one of {choices[dotted]}, got "
                            f"{kwargs[name]!r}")
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise error(f"{source}: missing required key {dotted!r}")
    return cls(**kwargs)
