"""The README's Python example runs verbatim and its commands exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from stars.cli import app
from stars.models.factory import bundled_teacher_path

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def test_python_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    if not bundled_teacher_path().is_file():
        pytest.skip("the bundled teacher weights are not in this checkout")
    (code,) = _blocks("python")
    exec(compile(code, str(README), "exec"), {})
    assert "'bn'" in capsys.readouterr().out


def test_every_command_in_the_readme_exists() -> None:
    """Every ``stars`` line of a bash block names a command, and its ``--options`` exist."""
    runner = CliRunner()
    help_text = runner.invoke(app, ["--help"]).output
    config_help = runner.invoke(app, ["config", "--help"]).output
    for block in _blocks("bash"):
        for line in block.splitlines():
            words = line.split("#")[0].split()
            if len(words) >= 2 and words[0] == "stars" and not words[1].startswith("-"):
                assert words[1] in help_text, line
                command = words[1:3] if words[1] == "config" else words[1:2]
                if words[1] == "config":
                    assert words[2] in config_help, line
                shown = runner.invoke(app, [*command, "--help"], terminal_width=200).output
                options = set(re.findall(r"--[a-z][a-z0-9-]*", shown))
                for opt in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", line.split("#")[0]):
                    assert opt in options, f"{line}: {opt} is not an option of {command}"


def test_every_yaml_snippet_in_the_readme_is_a_valid_config() -> None:
    """A YAML block in the README is a fragment of a run config: it validates as one."""
    import yaml

    from stars.config import RunConfig

    blocks = _blocks("yaml")
    assert blocks, "the README shows at least one config fragment"
    for block in blocks:
        RunConfig.model_validate(yaml.safe_load(block))
