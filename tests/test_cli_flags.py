"""The command line is derived from the config dataclasses: one flag per setting, with its help, default and
choices, under the names users and scripts already call."""

import argparse
import dataclasses
import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pkd_offline.cli import CLI_ONLY, STAGES, _flags, build_parser, main
from pkd_offline.config import make_config, resolve_choices, scalar_type

COMMANDS = {"extract": ["extract"], "train": ["train"], "eval": ["eval"], "verify": ["verify"],
            "synth": ["data", "synth"]}

FLAGS_IN_USE = {  # flag -> destination, as scripts, dvc.yaml and users call them
    "extract": {"--teacher": "teacher", "--checkpoint": "checkpoint", "--random-init": "random_init",
                "--variant": "variant", "--data": "data", "--split": "split", "--out": "out",
                "--format": "store_format", "--codec": "codec", "--pca-step": "pca_step", "--views": "views",
                "--levels": "levels", "--layout": "layout", "--student-levels": "student_levels",
                "--short-side": "short_side", "--max-size": "max_size", "--batch-size": "batch_size",
                "--workers": "workers", "--device": "device", "--samples-per-shard": "samples_per_shard",
                "--on-error": "on_error", "--with-images": "with_images", "--overwrite": "overwrite",
                "--no-cuda-graphs": "cuda_graphs", "--seed": "seed", "--no-progress": "progress"},
    "train": {"--student": "student", "--backbone": "backbone", "--backbone-weights": "backbone_weights",
              "--variant": "variant", "--anchor-scale": "anchor_scale", "--head-norm": "head_norm", "--data": "data",
              "--split": "split", "--val-split": "val_split", "--val-store": "val_store", "--out": "out",
              "--epochs": "epochs", "--iters": "iters", "--stop-after": "stop_after", "--batch-size": "batch_size",
              "--optimizer": "optimizer", "--lr": "lr", "--weight-decay": "weight_decay",
              "--warmup-iters": "warmup_iters", "--schedule": "schedule", "--short-side": "short_side",
              "--max-size": "max_size", "--views": "views", "--workers": "workers", "--device": "device",
              "--seed": "seed", "--resume": "resume", "--checkpoint-every": "checkpoint_every",
              "--eval-every": "eval_every", "--features": "features", "--teacher": "teacher",
              "--checkpoint": "teacher_checkpoint", "--random-init": "random_init",
              "--online-per-image": "online_per_image", "--alpha": "alpha", "--level-map": "level_map",
              "--max-pairs": "max_pairs", "--on-error": "on_error", "--no-progress": "progress"},
    "eval": {"--checkpoint": "checkpoint", "--data": "data", "--split": "split", "--store": "store", "--out": "out",
             "--device": "device", "--batch-size": "batch_size", "--json": "json", "--no-progress": "progress"},
    "verify": {"--data": "data", "--checkpoint": "checkpoint", "--samples": "samples", "--device": "device",
               "--json": "json", "--no-progress": "progress"},
    "synth": {"--out": "out", "--train": "train", "--val": "val", "--image-size": "image_size", "--seed": "seed"},
}


def config_class(name: str) -> type:
    return getattr(importlib.import_module(STAGES[name].module), STAGES[name].config)


def subcommand(name: str) -> argparse.ArgumentParser:
    """The (populated) parser of ``pkd-offline COMMAND...``."""
    parser = build_parser()
    for word in COMMANDS[name]:
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
        parser.format_usage()  # fills a lazily built parser
    return parser


def option_blocks(help_text: str) -> dict[str, str]:
    """``--flag`` -> the text argparse prints for it (its metavar and help), whitespace removed (help wraps
    anywhere, also inside hyphenated words)."""
    blocks: dict[str, str] = {}
    flag = None
    for line in help_text.split("options:", 1)[1].splitlines():
        match = re.match(r"^  (-[\w-]+)", line)
        if match:
            flag = match.group(1)
            blocks[flag] = line[match.end():]
        elif flag is not None:
            blocks[flag] += line
    return {flag: re.sub(r"\s+", "", text) for flag, text in blocks.items()}


def squeeze(text: str) -> str:
    return re.sub(r"\s+", "", text)


@pytest.mark.parametrize("name", ["extract", "train", "eval"])
def test_help_shows_every_setting_with_its_help_default_and_choices(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_info:
        main([*COMMANDS[name], "--help"])
    assert exit_info.value.code == 0
    blocks = option_blocks(capsys.readouterr().out)
    flags = {action.dest: action.option_strings[-1] for action in subcommand(name)._actions if action.option_strings}
    for field in dataclasses.fields(config_class(name)):
        block = blocks[flags[field.name]]
        assert field.metadata.get("help"), f"{name} setting {field.name} has no help"
        assert squeeze(field.metadata["help"]) in block, (field.name, block)
        if field.default is None:
            assert "default:unset" in block or "unset" in squeeze(field.metadata["help"]), (field.name, block)
        elif isinstance(field.default, bool):
            assert "(default:" in block, (field.name, block)
        else:
            assert f"(default:{squeeze(str(field.default))})" in block, (field.name, block)
        for choice in resolve_choices(field) or ():
            assert choice in block, (field.name, choice, block)
    if name in ("extract", "train"):
        assert all(teacher in blocks["--teacher"] for teacher in ("swin", "swin_s", "swin_b", "resnet50"))


def sample_value(field: dataclasses.Field, scalar: type) -> tuple[list[str], object]:
    """Command-line words for ``field`` (of scalar type ``scalar``) that are not its default, and what the
    config then holds."""
    if scalar is bool:
        return [], not field.default
    choices = resolve_choices(field)
    if choices:
        value = next(c for c in reversed(choices) if c != field.default)
        return [value], value
    text = {int: "7", float: "0.5"}.get(scalar, "some/where")
    return [text], {int: 7, float: 0.5, Path: Path(text)}.get(scalar, text)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_setting_has_a_flag_that_sets_it_and_nothing_else(name):
    cls = config_class(name)
    parser = subcommand(name)
    destinations = {action.dest for action in parser._actions} - CLI_ONLY - {"help"}
    assert destinations == {field.name for field in dataclasses.fields(cls)}
    actions = {action.dest: action for action in parser._actions}
    needed = {}  # positional and required settings: given in every call
    for field in dataclasses.fields(cls):
        action = actions[field.name]
        if not action.option_strings or action.required:
            words, _ = sample_value(field, scalar_type(field.type))
            needed[field.name] = action.option_strings[-1:] + words
    for field in dataclasses.fields(cls):
        words, expected = sample_value(field, scalar_type(field.type))
        option = actions[field.name].option_strings[-1:]
        argv = [*(w for name_, given in needed.items() if name_ != field.name for w in given), *option, *words]
        flags = _flags(parser.parse_args(argv))
        assert {k for k, v in flags.items() if v is not None} == {field.name, *needed}, field.name
        assert getattr(make_config(cls, {}, flags), field.name) == expected, field.name


@pytest.mark.parametrize("name", list(FLAGS_IN_USE))
def test_the_flags_in_use_keep_their_names_and_destinations(name):
    options = {flag: action.dest for action in subcommand(name)._actions for flag in action.option_strings}
    assert {flag: options.get(flag) for flag in FLAGS_IN_USE[name]} == FLAGS_IN_USE[name]


def test_a_bad_name_is_one_line_from_the_config_check_listing_the_known_ones(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--schedule", "linear"]) == 2
    assert capsys.readouterr().err == "pkd-offline: error: unknown schedule 'linear': choose one of cosine, step\n"


def test_top_level_help_imports_no_stage():
    code = ("import sys; from pkd_offline.cli import build_parser; build_parser().format_help(); "
            "print(sorted(m for m in sys.modules if m.startswith('stages') or m == 'torch'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "[]", result.stdout
