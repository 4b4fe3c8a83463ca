"""The ``stars`` command line (Typer). Thin: a config path plus ``--set`` overrides in, the
pipeline does the work. Every user error (:class:`stars.errors.StarsError`) is printed
without a traceback and exits with code 2."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.panel import Panel
from rich.pretty import Pretty

from stars import __version__
from stars.config import RunConfig, TeacherTrainConfig, load_config, load_teacher_config
from stars.errors import StarsError

app = typer.Typer(
    name="stars",
    help="ANN-to-SNN data-free knowledge distillation (STARS: BN-guided synthesis + "
    "Relational Consistency Alignment + Tail-Aware Regularization).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect and validate run configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")

console = Console()
err_console = Console(stderr=True)

P = ParamSpec("P")
R = TypeVar("R")

ConfigArg = Annotated[
    Path, typer.Argument(help="YAML run config.", show_default=False, dir_okay=False)
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a field: --set student.T=6 (repeatable)."),
]


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn :class:`StarsError` into a red message on stderr and exit code 2."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except StarsError as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
def version() -> None:
    """Print the stars version."""
    console.print(f"stars {__version__}")


@config_app.command("schema")
def config_schema(
    teacher: Annotated[
        bool, typer.Option("--teacher", help="The train-teacher config instead.")
    ] = False,
) -> None:
    """Print the JSON schema of the run config."""
    model = TeacherTrainConfig if teacher else RunConfig
    sys.stdout.write(json.dumps(model.model_json_schema(), indent=2) + "\n")


def _load_any(path: Path, overrides: list[str] | None, teacher: bool) -> Any:
    return (load_teacher_config if teacher else load_config)(path, overrides or [])


TeacherFlag = Annotated[bool, typer.Option("--teacher", help="Validate as a train-teacher config.")]


@config_app.command("validate")
@user_errors
def config_validate(path: ConfigArg, set_: SetOpt = None, teacher: TeacherFlag = False) -> None:
    """Validate a config file (with overrides); exit 2 with the field path when invalid."""
    _load_any(path, set_, teacher)
    console.print(f"[green]valid[/]: {path}")


@config_app.command("show")
@user_errors
def config_show(path: ConfigArg, set_: SetOpt = None, teacher: TeacherFlag = False) -> None:
    """Show the resolved config (defaults filled in, overrides applied)."""
    cfg = _load_any(path, set_, teacher)
    console.print(Panel(Pretty(cfg.model_dump(mode="json"), expand_all=True), title=str(path)))


@app.command("train-teacher")
@user_errors
def train_teacher_cmd(
    path: ConfigArg,
    set_: SetOpt = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing run directory.")] = False,
) -> None:
    """Train an ANN teacher on real images; writes safetensors weights and metadata."""
    from stars.teacher_training import train_teacher

    cfg = load_teacher_config(path, set_ or [])
    result = train_teacher(cfg, overwrite=overwrite, console=console)
    acc = "n/a" if result.test_top1 is None else f"{result.test_top1:.2f}%"
    console.print(
        f"teacher weights: {result.weights}  test top-1: {acc}  ({result.seconds / 60:.1f} min)"
    )


def main() -> None:  # pragma: no cover - console entry for `python -m stars.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
