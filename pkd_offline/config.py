"""Stage configs are dataclasses, filled from a ``params.yaml`` section and then command-line flags (flags win)."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pkd_offline.errors import PkdError
from pkd_offline.weights_source import is_url

Config = TypeVar("Config")


def load_params(path: Path | None, section: str) -> dict[str, Any]:
    """The ``section`` mapping of a params YAML file ({} when no file is given)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise PkdError(f"params file {path} not found")
    try:
        content = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise PkdError(f"params file {path} is not valid YAML: {str(error).splitlines()[0]}") from None
    values = content.get(section, {}) if isinstance(content, dict) else None
    if not isinstance(values, dict):
        raise PkdError(f"params file {path}: section {section!r} must be a mapping")
    return values


def _coerce(value: Any, annotation: Any) -> Any:
    if value is None:
        return None
    if isinstance(annotation, str):
        annotation = eval(annotation, {"Path": Path, "tuple": tuple, "list": list})  # noqa: S307 - dataclass annotations only
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _coerce(value, inner[0])
    if annotation is Path:  # a weights URL stays a string: Path would fold its "//"
        return value if is_url(value) else Path(value)
    if annotation in (int, float, str, bool) and not isinstance(value, annotation):
        if annotation is bool:
            raise PkdError(f"expected true/false, got {value!r}")
        return annotation(value)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def make_config(cls: type[Config], params: dict[str, Any], flags: dict[str, Any]) -> Config:
    """Build ``cls`` from params, then flags whose value is not None. Unknown keys are a PkdError."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise PkdError(f"unknown {cls.__name__} settings in params: {', '.join(unknown)} (known: {', '.join(fields)})")
    values = {**params, **{k: v for k, v in flags.items() if v is not None and k in fields}}
    try:
        return cls(**{k: _coerce(v, fields[k].type) for k, v in values.items()})
    except (TypeError, ValueError) as error:
        raise PkdError(f"bad {cls.__name__} setting: {error}") from None


def to_plain(config: Any) -> dict[str, Any]:
    """A dataclass as JSON/YAML-safe primitives (paths become strings)."""
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(config).items()}
