"""dvc.yaml lists, for every stage, the project code its command runs, so ``dvc repro`` re-runs a stage after a change
to that code instead of reusing its old outputs.

A stage's code is found without running it: the command names an entry module (``pkd-offline SUBCOMMAND``: the CLI
and the subcommand's stage module from ``pkd_offline.cli.STAGES``, which the CLI imports lazily; ``python -m
MODULE``: that module), and the project modules it imports, at any depth and inside functions too, are followed by
parsing each file with ``ast``. Every file reached must lie at or under one of the stage's deps.
"""

from __future__ import annotations

import ast
import shlex
from pathlib import Path

import pytest
import yaml

from pkd_offline.cli import STAGES

ROOT = Path(__file__).resolve().parents[1]


def module_file(name: str) -> Path | None:
    """The repository file of module ``name`` (``a.b`` -> a/b.py or a/b/__init__.py); None outside the project."""
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def with_parents(name: str) -> list[str]:
    """``a.b.c`` -> a, a.b, a.b.c: importing a module runs its packages' __init__ first."""
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def imported_names(path: Path, module: str) -> set[str]:
    """Absolute names of what ``path`` (module ``module``) imports anywhere in its body; for ``from X import y``
    both X and X.y (y may be a submodule)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def project_files(entries: list[str], not_from: dict[str, frozenset[str]] | None = None) -> set[Path]:
    """Every project file the modules ``entries`` import, transitively, themselves included. ``not_from``: per
    importing module, the modules its imports are not followed to (those run for another command)."""
    not_from = not_from or {}
    seen: set[str] = set()
    files: set[Path] = set()
    todo = [parent for entry in entries for parent in with_parents(entry)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        if path is None:
            continue
        files.add(path)
        skip = not_from.get(name, frozenset())
        todo.extend(parent for imported in imported_names(path, name) for parent in with_parents(imported)
                    if not any(parent == s or parent.startswith(s + ".") for s in skip))
    return files


def entry_modules(cmd: str) -> tuple[list[str], dict[str, frozenset[str]]]:
    """The modules a stage's command starts in, and per module the imports it does not run (``project_files``'s
    ``not_from``): for a ``pkd-offline`` subcommand, the CLI's imports of the other subcommands' stage modules."""
    words = shlex.split(cmd)
    if words[0] == "pkd-offline":
        command = words[2] if words[1] == "data" else words[1]  # `pkd-offline data synth` runs the synth stage
        assert command in STAGES, f"{cmd!r}: no stage module for subcommand {command!r} in pkd_offline.cli.STAGES"
        own = STAGES[command].module
        others = {stage.module for stage in STAGES.values()} | cli_stage_imports()
        return ["pkd_offline.cli", own], {"pkd_offline.cli": frozenset(others - set(with_parents(own)))}
    if words[:2] in (["python", "-m"], ["python3", "-m"]):
        return [words[2]], {}
    raise AssertionError(f"{cmd!r}: this test does not know which module the command runs")


def cli_stage_imports() -> set[str]:
    """The stage modules (``stages.*``) pkd_offline/cli.py imports by name, each for its own subcommand."""
    return {name for name in imported_names(module_file("pkd_offline.cli"), "pkd_offline.cli")
            if name.startswith("stages.") and module_file(name) is not None}


def expand(stages: dict) -> dict[str, dict]:
    """dvc.yaml's stages with each ``foreach``/``do`` stage expanded per item (``${item}`` substituted)."""
    expanded = {}
    for name, stage in stages.items():
        if "foreach" not in stage:
            expanded[name] = stage
            continue
        for item in stage["foreach"]:
            text = yaml.safe_dump(stage["do"]).replace("${item}", str(item))
            expanded[f"{name}@{item}"] = yaml.safe_load(text)
    return expanded


def uncovered(cmd: str, deps: list[str]) -> list[str]:
    """Project files (relative paths) that ``cmd`` runs and no dep covers. Empty files (a bare package
    __init__.py) run no code and are left out."""
    roots = [ROOT / dep for dep in deps]
    missing = []
    for path in sorted(project_files(*entry_modules(cmd))):
        if not path.read_text().strip():
            continue
        if not any(path == root or root in path.parents for root in roots):
            missing.append(str(path.relative_to(ROOT)))
    return missing


STAGES_OF_DVC = expand(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


@pytest.mark.parametrize("name", sorted(STAGES_OF_DVC))
def test_every_stage_lists_the_code_its_command_imports(name):
    stage = STAGES_OF_DVC[name]
    missing = uncovered(stage["cmd"], stage.get("deps", []))
    assert not missing, f"dvc.yaml stage {name!r} runs {missing} but its deps do not list them (or a folder above)"


def relative_files(cmd: str) -> set[str]:
    return {str(path.relative_to(ROOT)) for path in project_files(*entry_modules(cmd))}


def test_the_import_walk_follows_lazy_imports_and_only_the_subcommands_stage():
    # `data synth` reaches storage only through the CLI's main(), which imports it inside the function
    synth = relative_files("pkd-offline data synth --out x")
    assert {"pkd_offline/cli.py", "stages/synth.py", "storage/errors.py"} <= synth
    assert not {"stages/inspect.py", "stages/extract.py", "stages/train.py"} & synth  # other subcommands' stages
    # extract reaches the stage module the CLI imports by name from STAGES, and storage through it
    extract = relative_files("pkd-offline extract --out x")
    assert {"stages/extract.py", "storage/__init__.py"} <= extract
    assert uncovered("pkd-offline extract --out x", ["stages/extract.py", "pkd_offline"])
