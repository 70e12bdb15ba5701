"""The command line: parses flags into a stage's dataclass config and calls the stage function.

Every flag of a stage comes from a field of its config (``pkd_offline.config.setting``): ``--field-name``
(or the field's ``flag``), typed from the annotation, with its help, default and choices. Flags default
to None, so settings come from ``--params FILE`` (section ``--section``, by default the command's name)
and then from the flags given, which win. A stage's config (and so torch) is imported only when that
command's parser is used. User errors print one line and exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import Any, Callable, NamedTuple

from pkd_offline.config import flag_name, load_params, make_config, path_or_url, resolve_choices, scalar_type
from pkd_offline.errors import PkdError
from pkd_offline.weights_source import OFFLINE_ENV, offline_mode

CLI_ONLY = {"params", "section", "offline", "json"}
"""Options of the command line itself, not settings of a stage."""


class Stage(NamedTuple):
    """A subcommand over a stage function: where its config and function live, and its one-line help."""

    module: str
    config: str
    function: str
    help: str


STAGES = {
    "synth": Stage("stages.synth", "SynthConfig", "synth", "generate the synthetic COCO-format detection set"),
    "extract": Stage("stages.extract", "ExtractConfig", "extract", "stage one: store the teacher's FPN features"),
    "train": Stage("stages.train", "TrainConfig", "train", "stage two: train a detector (plain, offline PKD or "
                   "online PKD)"),
    "eval": Stage("stages.evaluate", "EvalConfig", "evaluate", "COCO box AP of a checkpoint"),
    "verify": Stage("stages.verify", "VerifyConfig", "verify", "check a store's shards and recompute samples with "
                    "its teacher"),
}


def config_class(stage: Stage) -> type:
    return getattr(importlib.import_module(stage.module), stage.config)


def stage_function(stage: Stage) -> Callable[[Any], Any]:
    return getattr(importlib.import_module(stage.module), stage.function)


class LazyParser(argparse.ArgumentParser):
    """An ArgumentParser that adds its arguments (``populate(parser)``) the first time it parses or prints help,
    so ``pkd-offline --help`` imports no stage."""

    def __init__(self, *args: Any, populate: Callable[[argparse.ArgumentParser], None] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.populate = populate

    def _populated(self) -> None:
        if self.populate is not None:
            populate, self.populate = self.populate, None
            populate(self)

    def parse_known_args(self, args=None, namespace=None):
        self._populated()
        return super().parse_known_args(args, namespace)

    def format_help(self) -> str:
        self._populated()
        return super().format_help()

    def format_usage(self) -> str:
        self._populated()
        return super().format_usage()


def _default_text(field: dataclasses.Field) -> str:
    if field.default is dataclasses.MISSING:
        return "required"
    if field.default is True:  # the flag is --no-NAME
        return f"default: {field.name.replace('_', ' ')} on"
    if field.default is False:
        return "default: off"
    if field.default is None:  # the help says what unset means, or this does
        return "" if "unset" in field.metadata.get("help", "") else "default: unset"
    return f"default: {field.default}"


def add_config_flags(parser: argparse.ArgumentParser, config: type) -> None:
    """One argument per field of the dataclass ``config``, destination the field's name, default None (so a
    params file's value stands unless the flag is given), named by the field's metadata or its name. A bool is a switch: ``--name`` sets True, or for a field that defaults to True ``--no-name`` sets
    False. A name without dashes is a positional argument."""
    for field in dataclasses.fields(config):
        name = field.metadata.get("flag") or flag_name(field)
        default = _default_text(field)
        help_text = (field.metadata.get("help") or field.name) + (f" ({default})" if default else "")
        value_type = scalar_type(field.type)
        if not name.startswith("-"):
            parser.add_argument(name, help=help_text, type=path_or_url if value_type is Path else value_type)
            continue
        options: dict[str, Any] = {"dest": field.name, "default": None, "help": help_text}
        if value_type is bool:
            options.update(action="store_const", const=field.default is not True)
        else:
            choices = resolve_choices(field)
            options.update(type=path_or_url if value_type is Path else value_type,
                           required=field.default is dataclasses.MISSING)
            if choices is not None:  # shown, not enforced here: the config's check names the fix in one line
                options["metavar"] = "{" + ",".join(choices) + "}"
        parser.add_argument(name, **options)


def _fill_stage_parser(name: str, parser: argparse.ArgumentParser) -> None:
    """The options of stage ``name``'s parser: the CLI's own, then one per setting of its config."""
    parser.add_argument("--params", type=Path, help="YAML file of settings (flags win)")
    parser.add_argument("--section", default=name, help=f"section of --params to read (default: {name})")
    if name != "synth":  # the stages that may fetch weights
        parser.add_argument("--offline", action="store_true", help="weight URLs only from the cache, never the "
                            f"network (also {OFFLINE_ENV}=1)")
    if name in ("eval", "verify"):
        parser.add_argument("--json", action="store_true", help="print the result as JSON")
    add_config_flags(parser, config_class(STAGES[name]))


def _inspect_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("store", help="store path or fsspec URL")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pkd-offline", description="Offline PKD: distil object detectors against "
                                     "stored teacher FPN features.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=LazyParser)
    data = commands.add_parser("data", help="make data sets")
    data_commands = data.add_subparsers(dest="data_command", required=True, parser_class=LazyParser)
    data_commands.add_parser("synth", help=STAGES["synth"].help, populate=partial(_fill_stage_parser, "synth"))
    for name in ("extract", "train", "eval"):
        commands.add_parser(name, help=STAGES[name].help, populate=partial(_fill_stage_parser, name))
    commands.add_parser("inspect", help="a feature store's manifest, sizes and digest", populate=_inspect_parser)
    commands.add_parser("verify", help=STAGES["verify"].help, populate=partial(_fill_stage_parser, "verify"))
    return parser


def _flags(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in CLI_ONLY | {"command", "data_command"}}


def run(args: argparse.Namespace) -> int:
    if args.command == "inspect":
        from stages.inspect import inspect_store

        print(inspect_store(args.store, as_json=args.json))
        return 0
    stage = STAGES["synth" if args.command == "data" else args.command]
    config = make_config(config_class(stage), load_params(args.params, args.section), _flags(args))
    result = stage_function(stage)(config)
    if args.command in ("eval", "verify") and args.json:
        print(json.dumps(result))
    elif args.command == "eval":
        print("  ".join(f"{k} {v:.4f}" for k, v in result.items()))
    elif args.command == "verify":
        print(result["text"])
    elif args.command == "data" or os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 alone reports
        print(result)
    return 1 if args.command == "verify" and not result["ok"] else 0


def one_line(error: BaseException) -> str:
    """The error's message as one line (errors re-raised from DataLoader workers carry a traceback text)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = lines[-1]
    for prefix in ("pkd_offline.errors.PkdError: ", "storage.errors.StoreError: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return lines[0] if len(lines) == 1 else last


def main(argv: list[str] | None = None) -> int:
    from storage.errors import StoreError
    from storage.files import close_object_store_sessions

    args = build_parser().parse_args(argv)
    try:
        with offline_mode(getattr(args, "offline", False)):
            return run(args)
    except (PkdError, StoreError) as error:
        print(f"pkd-offline: error: {one_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pkd-offline: interrupted", file=sys.stderr)
        return 130
    finally:
        close_object_store_sessions()  # before exit, where s3fs's own close may not get the time


if __name__ == "__main__":
    sys.exit(main())
