"""The ``stars`` command line (Typer). Thin: a config path plus ``--set`` overrides in, the
pipeline does the work. Every user error (:class:`stars.errors.StarsError`) is printed
without a traceback and exits with code 2."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from enum import StrEnum
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console
from rich.panel import Panel
from rich.pretty import Pretty

from stars import __version__
from stars.config import (
    RunConfig,
    TeacherTrainConfig,
    load_any_config,
    load_config,
    load_teacher_config,
)
from stars.errors import StarsError
from stars.runtime import tune_malloc

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
    """Turn :class:`StarsError` into a red message on stderr and exit code 2 (and tune the
    CPU allocator for the command's work: :func:`stars.runtime.tune_malloc`)."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        tune_malloc()
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
    if teacher:
        return load_teacher_config(path, overrides or [])
    return load_any_config(path, overrides or [])  # a teacher config is told by its sections


TeacherFlag = Annotated[
    bool,
    typer.Option(
        "--teacher",
        help="Validate as a train-teacher config (without it: recognised by its train section).",
    ),
]


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
    from stars.recipes.train_teacher import train_teacher

    cfg = load_teacher_config(path, set_ or [])
    result = train_teacher(cfg, overwrite=overwrite, console=console)
    acc = "n/a" if result.test_top1 is None else f"{result.test_top1:.2f}%"
    console.print(
        f"teacher weights: {result.weights}  test top-1: {acc}  ({result.seconds / 60:.1f} min)"
    )


ResumeOpt = Annotated[
    Path | None,
    typer.Option("--resume", help="Continue the run in this directory from its checkpoint."),
]
OverwriteOpt = Annotated[
    bool, typer.Option("--overwrite", help="Replace an existing run directory.")
]


@app.command()
@user_errors
def distill(
    path: ConfigArg,
    set_: SetOpt = None,
    resume: ResumeOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Distill the teacher into a spiking student from synthetic data (Fast/DeepInversion/
    DAFL/DFAD, with STARS when its weights are set)."""
    from stars.recipes.distill import Interrupted, run_distill

    cfg = load_config(path, set_ or [])
    if resume is not None and (resume / "config.yaml").is_file():
        saved = load_config(resume / "config.yaml")
        if saved != cfg:
            console.print(
                f"[yellow]--resume uses the run's own config ({resume / 'config.yaml'}); "
                f"the differences in {path} and --set are ignored.[/]",
                soft_wrap=True,
            )
    try:
        run_distill(cfg, resume=resume, overwrite=overwrite, console=console)
    except Interrupted as exc:
        raise typer.Exit(130 if exc.signum == 2 else 0) from None
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


@app.command()
@user_errors
def evaluate(
    checkpoint: Annotated[Path, typer.Argument(help="A teacher or student .safetensors file.")],
    data: Annotated[
        Path | None,
        typer.Option(help="Dataset root (default: the one in the checkpoint's config)."),
    ] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    max_images: Annotated[
        int | None, typer.Option(help="Evaluate on a fixed random subset of this size.")
    ] = None,
) -> None:
    """Top-1 of a teacher; for a student also firing rates, SynOps and energy."""
    from stars.recipes.evaluate import evaluate_checkpoint

    evaluate_checkpoint(
        checkpoint, data=data, device=device, max_images=max_images, console=console
    )


@app.command()
@user_errors
def synthesize(
    path: Annotated[
        Path | None,
        typer.Argument(help="YAML run config (not with --from-run).", show_default=False),
    ] = None,
    num: Annotated[
        int | None,
        typer.Option(
            "--num",
            help="Images, split evenly over the classes (default 64; with --from-run: a "
            "class-balanced subset of the bank, default the whole bank).",
            show_default=False,
        ),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", help="Output folder; appears whole or not at all.")
    ] = Path("synthetic"),
    steps: Annotated[
        float,
        typer.Option(
            "--steps",
            help="Factor on the method's own optimization budget: its warm-up batches and its "
            "steps per batch (2 = twice as long, 0.5 = half).",
        ),
    ] = 1.0,
    from_run: Annotated[
        Path | None,
        typer.Option("--from-run", help="Export the memory bank of this `stars distill` run."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a non-empty --out folder.")
    ] = False,
    set_: SetOpt = None,
) -> None:
    """Write a synthetic dataset (ImageFolder, named grid, quality.json): synthesized from the
    teacher alone to the method's budget, or a finished run's memory bank (--from-run)."""
    from stars.recipes.synthesize import export_run, synthesize_dataset

    if from_run is not None:
        if path is not None or set_ or steps != 1.0:
            raise StarsError(
                "--from-run exports the run's bank with the run's own config.yaml; "
                "drop CONFIG, --set and --steps"
            )
        export_run(from_run, out=out, num=num, overwrite=overwrite, console=console)
        return
    if path is None:
        raise StarsError("give a run CONFIG to synthesize from, or --from-run RUN_DIR")
    cfg = load_config(path, set_ or [])
    synthesize_dataset(
        cfg,
        num=64 if num is None else num,
        out=out,
        steps=steps,
        overwrite=overwrite,
        console=console,
    )


@app.command()
@user_errors
def ablate(
    path: ConfigArg,
    variants: Annotated[
        str, typer.Option(help="Comma-separated: baseline, rca, tar, stars.")
    ] = "baseline,rca,tar,stars",
    seeds: Annotated[int, typer.Option(min=1, help="Seeds per variant (0..N-1).")] = 3,
    set_: SetOpt = None,
    out: Annotated[
        Path | None, typer.Option(help="Folder for the table (default: output_dir/ablate-NAME).")
    ] = None,
) -> None:
    """Run baseline vs +RCA vs +TAR vs STARS over seeds; print mean and std of top-1."""
    from stars.recipes.ablate import run_ablation

    cfg = load_config(path, set_ or [])
    run_ablation(
        cfg,
        variants=[v.strip() for v in variants.split(",") if v.strip()],
        seeds=seeds,
        out=out,
        console=console,
    )


class ExportFormat(StrEnum):
    """Formats ``stars export`` writes."""

    nir = "nir"


@app.command()
@user_errors
def export(
    checkpoint: Annotated[
        Path, typer.Argument(help="A student.safetensors written by `stars distill`.")
    ],
    out: Annotated[Path, typer.Argument(help="The file to write.")],
    format_: Annotated[
        ExportFormat, typer.Option("--format", help="nir: the Neuromorphic IR (HDF5).")
    ] = ExportFormat.nir,
) -> None:
    """Export a spiking student for neuromorphic hardware and simulators (NIR).

    BatchNorm is folded into the convolutions; the graph's input is the image repeated over
    the student's T steps. Max-pooling (use the *_avg student variants) and soft reset are
    refused. Read it back with spikingjelly.activation_based.nir_exchange.import_from_nir.
    """
    from stars.models.nir_export import export_checkpoint, node_types

    graph = export_checkpoint(checkpoint, out)
    nodes = ", ".join(f"{kind}: {n}" for kind, n in node_types(graph).items())
    console.print(f"wrote {format_.value.upper()} graph {out} ({nodes})", soft_wrap=True)


@app.command("convert-checkpoint")
@user_errors
def convert_checkpoint(
    src: Annotated[Path, typer.Argument(help="A PyTorch .pt/.pth file you trust.")],
    dst: Annotated[Path, typer.Argument(help="The .safetensors file to write.")],
    arch: Annotated[str, typer.Option(help="Teacher architecture, e.g. resnet34.")],
    num_classes: Annotated[int, typer.Option(min=1, help="Number of classes.")],
    image_size: Annotated[int, typer.Option(min=8, help="Input size (32 CIFAR, 64 Tiny).")] = 32,
    from_: Annotated[
        str,
        typer.Option(
            "--from",
            help="Key layout of SRC: stars, or cmi (also fast-datafree, nayer, spaceshipnet: "
            "the same teachers); with cmi, --arch is their model name (resnet34, wrn40_2, "
            "vgg11...).",
        ),
    ] = "stars",
) -> None:
    """Convert a pickle checkpoint to safetensors for use as a teacher.

    Reads SRC with torch.load(weights_only=True): only tensors and plain containers are
    rebuilt, anything else is refused without being run. Maps the keys of --from's layout
    to stars', checks that the weights fit ARCH exactly, then writes DST and DST's .json
    metadata. stars itself never unpickles a file.
    """
    from stars.models.convert import convert_checkpoint as convert

    done = convert(
        src, dst, arch=arch, num_classes=num_classes, image_size=image_size, layout=from_
    )
    console.print(
        f"wrote {done.tensors} tensors to {dst} (metadata in {dst.with_suffix('.json')}); "
        f"use it as teacher.arch: {done.arch}, teacher.checkpoint: {dst}",
        soft_wrap=True,
    )


def main() -> None:  # pragma: no cover - console entry for `python -m stars.cli`
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
