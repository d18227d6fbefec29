"""Shared option aliases and the glue every command uses: params loading, overrides,
and turning bad input into one line and exit code 2."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

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

EvaluateTeacherOpt = Annotated[
    Optional[Path],
    typer.Option(
        "--teacher",
        "-t",
        help="Generators: the diffusion teacher; each model's paired error to its teacher_steps-step ODE samples. "
        "LMs: the teacher each model is compared with (KL, top-1 and greedy agreement, speed-up).",
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


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGTERM from ``kill``, a scheduler or ``docker stop``) raised where the
    program is, like Ctrl-C: ``with`` blocks unwind, so the partial output stays resumable,
    and ``except Exception`` in stage code does not swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _stop(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM -> ``Interrupted`` inside the block (Python's default would end the process at
    once, without a message); only the main thread can set handlers, elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """DistilError -> one line on stderr, exit 2 (so is a file distil may not read or write:
    the user's to fix, not a bug); Ctrl-C or SIGTERM -> one line saying a rerun resumes,
    exit 128 + the signal's number (130, 143), the partial output kept for that rerun."""
    try:
        with _stop_on_sigterm():
            yield
    except DistilError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)  # "holds ['val']" is no markup
        raise typer.Exit(2) from None
    except PermissionError as exc:
        where = exc.filename or exc
        err.print(
            f"[bold red]error:[/] permission denied: {escape(str(where))}; check its permissions", highlight=False, soft_wrap=True
        )
        raise typer.Exit(2) from None
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        err.print(f"interrupted ({signal.Signals(signum).name}): rerun the same command to resume from the last checkpoint")
        raise typer.Exit(128 + signum) from None


def done(path: Path, what: str) -> None:
    err.print(f"[green]wrote[/] {what} -> {path}")
