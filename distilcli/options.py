"""Shared option aliases and the glue every command uses: params loading, overrides,
and turning bad input into one line and exit code 2."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console

from stages.config import DataConfig, load_section, parse_overrides, read_params
from stages.errors import DistilError

err = Console(stderr=True)

ParamsOpt = Annotated[Path, typer.Option("--params", help="YAML file with one section per stage.")]
SectionOpt = Annotated[Optional[str], typer.Option("--section", help="Params section to read (default: the command's own).")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set", help="Override a param for this run: key=value (repeatable, dotted keys; data.KEY sets the data section)."
    ),
]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed (overrides the section's seed).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output directory (written atomically).")]
DataOpt = Annotated[
    str,
    typer.Option(
        "--data",
        "-d",
        help="Built-in task (digits; generators: moons, digits-images, ...), a distil table, or a .parquet/.csv file.",
    ),
]
FeaturesOpt = Annotated[
    Optional[str], typer.Option("--features", help="User tables: comma-separated feature columns, or one list column.")
]
LabelOpt = Annotated[Optional[str], typer.Option("--label", help="User tables: the label column.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary table on the terminal.")]
DecodeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--decode",
        help="LMs: greedy (the model's own choice) or scmoe (self-contrast of a mixture-of-experts model; "
        "tune with --set scmoe_beta/scmoe_alpha/scmoe_weak_rank).",
    ),
]

StepsOpt = Annotated[
    Optional[int],
    typer.Option(
        "--steps", help="Generators: sampling steps (diffusion teachers: ODE solver steps; consistency students: 1, 2, 4...)."
    ),
]
HybridOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--hybrid-first-step",
        help="Generators: this diffusion teacher takes the first sampling step, the consistency student the rest.",
    ),
]

GeneratorTeacherOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--teacher",
        "-t",
        help="Generators: the diffusion teacher; each model's paired error to its teacher_steps-step ODE samples.",
    ),
]


def config(cls: type, params_path: Path, section: str | None, default: str, sets: list[str] | None, **cli: Any) -> tuple[Any, dict[str, Any]]:
    """The stage's config: params section, then --set, then explicit CLI options (if given)."""
    params = read_params(params_path)
    overrides = parse_overrides(sets or [])
    data = overrides.pop("data", None)  # `--set data.limit=100` reaches the shared data section
    if data is not None:
        if not isinstance(data, dict):
            raise DistilError("--set data.KEY=VALUE sets one key of the data section")
        params = {**params, "data": {**(params.get("data") or {}), **data}}
    overrides.update({k: v for k, v in cli.items() if v is not None})
    return load_section(cls, params, section or default, overrides, shared=section is None), params


def data_config(params: dict[str, Any], features: str | None, label: str | None) -> DataConfig:
    cli = {"features": [f for f in features.split(",") if f]} if features else {}
    if label:
        cli["label"] = label
    return load_section(DataConfig, params, "data", cli)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """DistilError -> one line on stderr, exit 2 (so is a file distil may not read or write:
    the user's to fix, not a bug); Ctrl-C -> a hint that a rerun resumes."""
    try:
        yield
    except DistilError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except PermissionError as exc:
        where = exc.filename or exc
        err.print(f"[bold red]error:[/] permission denied: {where}; check its permissions", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err.print("interrupted: rerun the same command to resume from the last checkpoint")
        raise typer.Exit(130) from None


def done(path: Path, what: str) -> None:
    err.print(f"[green]wrote[/] {what} -> {path}")
