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
    help_text = CliRunner().invoke(app, ["--help"]).output
    config_help = CliRunner().invoke(app, ["config", "--help"]).output
    for block in _blocks("bash"):
        for line in block.splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] == "stars" and not words[1].startswith("-"):
                assert words[1] in help_text, line
                if words[1] == "config":
                    assert words[2] in config_help, line


def test_every_yaml_snippet_in_the_readme_is_a_valid_config() -> None:
    """A YAML block in the README is a fragment of a run config: it validates as one."""
    import yaml

    from stars.config import RunConfig

    blocks = _blocks("yaml")
    assert blocks, "the README shows at least one config fragment"
    for block in blocks:
        RunConfig.model_validate(yaml.safe_load(block))
