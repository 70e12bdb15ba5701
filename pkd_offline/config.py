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


WEIGHTS_HELP = "a path or URL (https://, s3://, file://), URLs cached in $TORCH_HOME/hub/checkpoints"
"""How a weights setting is given: the end of every checkpoint setting's help."""

ON_ERROR = ("stop", "skip")
"""What a stage does with a damaged sample: stop with its error, or skip it and count it."""


def setting(default: Any = dataclasses.MISSING, *, help: str, choices: Any = None, flag: str | None = None,
            noun: str | None = None) -> Any:
    """A config dataclass field with its command-line help: the one place a setting is defined.

    ``choices``: the names the setting accepts, a tuple or a zero-argument callable returning them (looked up
    when the parser is built, e.g. ``lambda: tuple(TEACHERS)``); ``flag``: the option's name where it is not
    ``--field-name`` (e.g. ``--no-cuda-graphs`` for a bool that defaults to True), a name without dashes for a
    positional argument; ``noun``: what the value names in the error for a name outside ``choices`` (default:
    the flag). The CLI builds every flag from these (``pkd_offline.cli``); params files use the field names.
    """
    metadata = {"help": help, "choices": choices, "flag": flag, "noun": noun}
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(field: dataclasses.Field) -> str:
    """The command-line name of a config field: its ``flag`` metadata, else ``--no-field-name`` for a bool
    that defaults to True, else ``--field-name``."""
    if field.metadata.get("flag"):
        return field.metadata["flag"]
    prefix = "--no-" if field.default is True else "--"
    return prefix + field.name.replace("_", "-")


def resolve_choices(field: dataclasses.Field) -> tuple[str, ...] | None:
    """The names a field accepts (its ``choices`` metadata, called when it is a function), or None."""
    choices = field.metadata.get("choices")
    return tuple(choices() if callable(choices) else choices) if choices is not None else None


def check_choices(config: Any) -> None:
    """PkdError (one line, the known names listed) for a field whose value is not one of its ``choices``;
    None is accepted where the field defaults to None."""
    for field in dataclasses.fields(config):
        names = resolve_choices(field)
        value = getattr(config, field.name)
        if names is None or value in names or (value is None and field.default is None):
            continue
        noun = field.metadata.get("noun") or f"{flag_name(field).lstrip('-')} value"
        raise PkdError(f"unknown {noun} {value!r}: choose one of {', '.join(names)}")


def path_or_url(value: str) -> str | Path:
    """A command-line or params value for a Path setting: a weights or store URL stays a string (Path would
    fold its "//"), anything else becomes a Path."""
    return value if is_url(value) else Path(value)


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


def scalar_type(annotation: Any) -> Any:
    """The type of a setting's value from its field's annotation (a string under ``from __future__ import
    annotations``): X for ``X | None``, str for a union with str (a path or a URL)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"Path": Path, "tuple": tuple, "list": list})  # noqa: S307 - dataclass annotations only
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return str if str in inner else inner[0]
    return annotation


def _coerce(value: Any, annotation: Any) -> Any:
    if value is None:
        return None
    annotation = scalar_type(annotation)
    origin = typing.get_origin(annotation)
    if annotation is Path:
        return path_or_url(value)
    if annotation in (int, float, str, bool) and not isinstance(value, annotation):
        if annotation is bool:
            raise PkdError(f"expected true/false, got {value!r}")
        return annotation(value)
    if origin is tuple and isinstance(value, (list, tuple)):
        return tuple(value)
    return value


def make_config(cls: type[Config], params: dict[str, Any], flags: dict[str, Any]) -> Config:
    """Build ``cls`` from params, then flags whose value is not None. Unknown keys are a PkdError. The values
    are checked by the stage function (:func:`check_config`), which the CLI and direct callers both go through."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        raise PkdError(f"unknown {cls.__name__} settings in params: {', '.join(unknown)} (known: {', '.join(fields)})")
    values = {**params, **{k: v for k, v in flags.items() if v is not None and k in fields}}
    try:
        return cls(**{k: _coerce(v, fields[k].type) for k, v in values.items()})
    except (TypeError, ValueError) as error:
        raise PkdError(f"bad {cls.__name__} setting: {error}") from None


def check_config(config: Any) -> None:
    """The config's own ``validate()`` where it has one (which checks its choices), else its choices alone:
    the one check of a config's values, run by the stage function (so for the CLI and for direct callers)."""
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    else:
        check_choices(config)


def to_plain(config: Any) -> dict[str, Any]:
    """A dataclass as JSON/YAML-safe primitives (paths become strings)."""
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(config).items()}
