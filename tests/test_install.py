"""The install is reproducible: CI runs exactly the README's test command, and every package installed in the
environment the tests run in is the version constraints.txt pins (``bash .ci/pin`` regenerates it)."""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_INSTALLED_BY_THE_PINS = {"pip", "pkd-offline"}  # the venv's own installer; the project itself (editable)


def normalised(name: str) -> str:
    """A distribution name as PyPI compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(path: Path) -> dict[str, str]:
    """``{name: version}`` of a constraints file's ``name==version`` lines."""
    rows = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {normalised(row.split("==")[0]): row.split("==")[1] for row in rows if "==" in row}


def readme_commands() -> list[str]:
    """The lines of the README's ```bash blocks."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def ci_command() -> str:
    """The one command .ci/run runs (its last line that is not a comment or a shell setting)."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in lines if line and not line.startswith(("#", "set ", "cd "))]
    assert len(commands) == 1, commands
    return commands[0]


def test_ci_runs_exactly_the_readme_test_command():
    command = ci_command()
    assert "pytest" in command and "PIP_CONSTRAINT=constraints.txt" in command and "venv --clear" in command
    assert command in readme_commands()


def test_the_readme_demo_command_installs_with_the_pins():
    demo = [line for line in readme_commands() if "dvc repro" in line]
    assert demo and all("PIP_CONSTRAINT=constraints.txt" in line and "venv" in line for line in demo)


def test_the_torch_pair_is_the_pinned_one():
    torch_pair = pins(ROOT / ".ci" / "torch.txt")
    assert set(torch_pair) == {"torch", "torchvision"}
    assert {name: pins(ROOT / "constraints.txt")[name] for name in torch_pair} == torch_pair


@pytest.mark.skipif(os.environ.get("PKD_UNPINNED") == "1", reason="bash .ci/latest installs without the pins")
def test_every_installed_package_is_the_pinned_version():
    pinned = pins(ROOT / "constraints.txt")
    installed = {normalised(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}
    unpinned = sorted(set(installed) - set(pinned) - NOT_INSTALLED_BY_THE_PINS)
    assert not unpinned, f"installed but not in constraints.txt (run bash .ci/pin): {unpinned}"
    moved = {name: (version, pinned[name]) for name, version in installed.items()
             if name in pinned and version != pinned[name]}
    assert not moved, f"installed version differs from the pin (installed, pinned): {moved}"
