"""The `distil` command: every subcommand wired in one visible list below.

Each command is an adapter: parse options, load its params section, call
``stages.<command>.run``, report what it wrote.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from distilcli.options import (
    DataOpt,
    DecodeOpt,
    DeviceOpt,
    EvaluateTeacherOpt,
    FeaturesOpt,
    HybridOpt,
    LabelOpt,
    OutOpt,
    ParamsOpt,
    QuietOpt,
    SectionOpt,
    SeedOpt,
    SetOpt,
    StepsOpt,
    config,
    data_config,
    done,
    handled,
)  # fmt: skip
from stages import __version__
from stages import cascade as cascade_stage
from stages import distill as distill_stage
from stages import doctor as doctor_stage
from stages import evaluate as evaluate_stage
from stages import generate_teacher_data as gtd_stage
from stages import select as select_stage
from stages import serve as serve_stage
from stages.classifier.cascade import POLICIES
from stages.classifier.methods import METHODS
from stages.classifier.selectors import SELECTORS
from stages.config import CascadeConfig, DistillConfig, EvaluateConfig, GenerateTeacherDataConfig, SelectConfig, ServeConfig
from stages.diffusion.methods import DIFFUSION_METHODS
from stages.lm.cascade import LM_POLICIES
from stages.lm.methods import LM_METHODS
from stages.lm.selectors import LM_SELECTORS

app = typer.Typer(
    name="distil",
    help="Make a cheaper model that behaves like an expensive one: teacher data, selection, distillation, cascades, evaluation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)

PARAMS = Path("params.yaml")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"distil {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = None,
) -> None:
    """distil: distillation pipelines as composable stages."""


def _list(table: dict[str, str]) -> str:
    return "\n\n".join(f"* `{k}`: {v}" for k, v in table.items())


def generate_teacher_data(
    teacher: Annotated[list[str], typer.Option("--teacher", "-t", help="Trained teacher model directory; LMs: a model name or an OpenAI-compatible server URL (http://HOST:PORT/v1) too, or repeat it for several teachers (rows carry a `teacher` index; for --method mst).")],
    data: DataOpt,
    out: OutOpt,
    decode: DecodeOpt = None,
    steps: StepsOpt = None, hybrid_first_step: HybridOpt = None,
    params: ParamsOpt = PARAMS, section: SectionOpt = None, set_: SetOpt = None, seed: SeedOpt = None,
    device: DeviceOpt = "auto", features: FeaturesOpt = None, label: LabelOpt = None, quiet: QuietOpt = False,
) -> None:  # fmt: skip
    """Run a teacher over a table and store its logits with the gold labels and splits.

    Example: `distil generate-teacher-data --teacher models/teacher --data digits --out data/teacher`

    Several LM teachers (for `distill --method mst`): `distil generate-teacher-data -t models/chain_sum -t models/basic_arithmetic --data chain_sum+basic_arithmetic --out data/mst`

    Generators (a diffusion teacher from `distill --method denoise`): samples from seeded noise with their ODE trajectories: `distil generate-teacher-data -t models/moons_teacher --data moons --steps 50 --out data/moons_traj`
    """
    with handled():
        cfg, p = config(GenerateTeacherDataConfig, params, section, "generate_teacher_data", set_, seed=seed, decode=decode,
                        steps=steps, hybrid_first_step=str(hybrid_first_step) if hybrid_first_step else None)  # fmt: skip
        path = gtd_stage.run(cfg, teacher, data, out, data_cfg=data_config(p, features, label), device=device, progress=not quiet)
        done(path, "teacher data")


def select(
    data: Annotated[Path, typer.Argument(help="Teacher data from generate-teacher-data (or, for --by uncertain, prompts).")],
    out: OutOpt,
    by: Annotated[Optional[str], typer.Option("--by", help="Strategy: " + ", ".join([*SELECTORS, *LM_SELECTORS, "uncertain"]) + "; LM filters chain with + (majority+dedup).")] = None,
    student: Annotated[Optional[Path], typer.Option("--student", help="--by uncertain: the LM student whose consistency is measured.")] = None,
    params: ParamsOpt = PARAMS, section: SectionOpt = None, set_: SetOpt = None, seed: SeedOpt = None,
    device: DeviceOpt = "auto", quiet: QuietOpt = False,
) -> None:  # fmt: skip
    """Filter and weight teacher data into a new table with `weight` and `reason` columns.

    Example: `distil select data/teacher --by confident --set threshold=0.9 --out data/selected`
    """
    with handled():
        cfg, p = config(SelectConfig, params, section, "select", set_, by=by, seed=seed)
        path = select_stage.run(
            cfg, data, out, student=student, data_cfg=data_config(p, None, None), device=device, progress=not quiet
        )
        done(path, "selection")


def distill(
    data: DataOpt,
    out: OutOpt,
    method: Annotated[Optional[str], typer.Option("--method", "-m", help="Training method (see the list above).")] = None,
    teacher: Annotated[
        Optional[list[str]],
        typer.Option("--teacher", "-t", help="Teacher run live on each (augmented) batch instead of stored logits (LMs: a directory, name or server URL)."),
    ] = None,
    student: Annotated[Optional[str], typer.Option("--student", "-s", help="LMs: start from this pretrained model (a directory, a shipped name such as smollm2-135m, or a hub name); the same as --set lm.init=... (with lora.r > 0 only a LoRA adapter trains).")] = None,
    params: ParamsOpt = PARAMS, section: SectionOpt = None, set_: SetOpt = None, seed: SeedOpt = None,
    device: DeviceOpt = "auto", features: FeaturesOpt = None, label: LabelOpt = None, quiet: QuietOpt = False,
) -> None:  # fmt: skip
    """Train a student (or, with `--method ce` on gold labels, a teacher).

    Example: `distil distill --method kd --data data/selected --out models/student --set epochs=20`

    A LoRA student on a pretrained model: `distil distill --method sft --data chain_sum --student smollm2-135m --set lora.r=8 --set lora.merge=true --out models/lora`
    """
    with handled():
        cfg, p = config(DistillConfig, params, section, "distill", set_, method=method, seed=seed)
        if student:
            from stages.lm.distill import with_student

            cfg = with_student(cfg, student, data, data_config(p, features, label))
        path = distill_stage.run(cfg, data, out, data_cfg=data_config(p, features, label), teachers=teacher or [],
                                 device=device, progress=not quiet)  # fmt: skip
        done(path, "model")


def cascade(
    student: Annotated[Path, typer.Option("--student", "-s", help="Student model: a directory (a LoRA student's too), a shipped name such as smollm2-135m, or a hub name.")],
    teacher: Annotated[str, typer.Option("--teacher", "-t", help="Teacher model directory (LMs: or an OpenAI-compatible server URL, http://HOST:PORT/v1).")],
    data: DataOpt,
    out: OutOpt,
    policy: Annotated[Optional[str], typer.Option("--policy", help="Classifiers: " + ", ".join(POLICIES) + ". Language models: " + ", ".join(LM_POLICIES) + ". Default auto: confidence / icd-sc-cascade.")] = None,
    policy_file: Annotated[Optional[Path], typer.Option("--policy-file", help="Use this calibrated policy instead of calibrating on dev.")] = None,
    model: Annotated[Optional[list[Path]], typer.Option("--model", help="weighted-vote: another LM whose samples vote (repeatable; costs name it model1, model2, ...).")] = None,
    online: Annotated[Optional[bool], typer.Option("--online", help="LMs: the teacher's answers to deferred queries join the demonstration bank.")] = None,
    params: ParamsOpt = PARAMS, section: SectionOpt = None, set_: SetOpt = None, seed: SeedOpt = None,
    device: DeviceOpt = "auto", features: FeaturesOpt = None, label: LabelOpt = None, quiet: QuietOpt = False,
) -> None:  # fmt: skip
    """Student answers when confident, the teacher answers the rest; threshold calibrated on dev.

    Example: `distil cascade --student models/student --teacher models/teacher --data data/teacher --out cascade`

    Language models (`--data` is LM teacher data): in-context distillation from the teacher data's train split, self-consistency cascades, costs in tokens.
    """
    with handled():
        cfg, p = config(CascadeConfig, params, section, "cascade", set_, policy=policy, seed=seed, online=online)
        path = cascade_stage.run(cfg, student, teacher, data, out, data_cfg=data_config(p, features, label),
                                 policy_file=policy_file, device=device, models=model or [], progress=not quiet)  # fmt: skip
        done(path, "cascade decisions")


def evaluate(
    data: DataOpt,
    out: OutOpt,
    model: Annotated[Optional[list[Path]], typer.Option("--model", help="Model directory (repeatable); LMs: a shipped name such as smollm2-135m or a hub name too.")] = None,
    cascade_dir: Annotated[Optional[list[Path]], typer.Option("--cascade", help="Cascade output directory (repeatable).")] = None,
    decode: DecodeOpt = None,
    steps: StepsOpt = None, hybrid_first_step: HybridOpt = None, teacher: EvaluateTeacherOpt = None,
    params: ParamsOpt = PARAMS, section: SectionOpt = None, set_: SetOpt = None, seed: SeedOpt = None,
    device: DeviceOpt = "auto", features: FeaturesOpt = None, label: LabelOpt = None, quiet: QuietOpt = False,
) -> None:  # fmt: skip
    """Accuracy, calibration, agreement and cost of models and cascades; sample quality of
    generators against their data and their teacher; DVC metrics and plots.

    Example: `distil evaluate --model models/teacher --model models/student --data data/teacher --out metrics`
    """
    with handled():
        cfg, p = config(EvaluateConfig, params, section, "evaluate", set_, seed=seed, decode=decode, steps=steps,
                        hybrid_first_step=str(hybrid_first_step) if hybrid_first_step else None,
                        teacher=str(teacher) if teacher else None)  # fmt: skip
        path = evaluate_stage.run(cfg, model or [], data, out, data_cfg=data_config(p, features, label),
                                  cascades=cascade_dir or [], device=device,
                                  console=Console(file=io.StringIO()) if quiet else None)  # fmt: skip
        done(path, "evaluation")


def serve(
    model: Annotated[Path, typer.Argument(help="A language model directory (a student or a teacher from `distil distill`).")],
    host: Annotated[Optional[str], typer.Option("--host", help="Address to listen on (default 127.0.0.1; 0.0.0.0 exposes it).")] = None,
    port: Annotated[Optional[int], typer.Option("--port", help="Port to listen on (default 8000).")] = None,
    teacher: Annotated[Optional[str], typer.Option("--teacher", "-t", help="Serve a cascade: MODEL is its student, this its teacher (a directory or server URL); needs --policy-file.")] = None,
    policy_file: Annotated[Optional[Path], typer.Option("--policy-file", help="Serve a cascade: the policy.json a `distil cascade` run calibrated for MODEL and --teacher.")] = None,
    params: ParamsOpt = PARAMS, section: SectionOpt = None, set_: SetOpt = None, seed: SeedOpt = None,
    device: DeviceOpt = "auto",
) -> None:  # fmt: skip
    """Serve a language model behind an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models) until SIGTERM or Ctrl-C, which drain the requests in flight.

    Example: `distil serve models/student --port 8000`, then `distil generate-teacher-data --teacher http://127.0.0.1:8000/v1 ...` or any OpenAI client.

    A calibrated cascade (each choice reports its route and cost in the `distil` field): `distil serve models/lm_kd --teacher models/lm_teacher --policy-file cascade_lm/policy.json`
    """
    with handled():
        cfg, _ = config(ServeConfig, params, section, "serve", set_, host=host, port=port, seed=seed)
        serve_stage.run(cfg, model, teacher=teacher, policy_file=policy_file, device=device)


def doctor(
    path: Annotated[Path, typer.Argument(help="An artifact: a table, a model, a cascade or an evaluation directory.")],
) -> None:
    """Verify an artifact: manifest, schema, parts, rows, content hash, NaN / inf, unreadable files, a killed run's partial.

    Prints one line per problem with how to repair it and exits 2; exits 0 with an `ok` line when healthy.

    Example: `distil doctor data/teacher`
    """
    with handled():
        report = doctor_stage.run(path)
    for finding in report.findings:
        typer.echo(str(finding))
    if not report.ok:
        raise typer.Exit(2)
    typer.echo(f"ok: {report.path}: {report.checked}")


distill.__doc__ = (
    (distill.__doc__ or "")
    + "\n\nClassifier methods (digits, user tables, teacher data):\n\n"
    + _list({k: m.help for k, m in METHODS.items()})
    + "\n\nLanguage-model methods (reasoning tasks such as `basic_arithmetic`, prompt tables):\n\n"
    + _list({k: m.help for k, m in LM_METHODS.items()})
    + "\n\nGenerator methods (2-D toy data `moons`, `eight-gaussians`, `checkerboard`, `swiss-roll`; `digits-images`):\n\n"
    + _list({k: m.help for k, m in DIFFUSION_METHODS.items()})
)
cascade.__doc__ = (
    (cascade.__doc__ or "")
    + "\n\nClassifier policies:\n\n"
    + _list(POLICIES)
    + "\n\nLanguage-model policies:\n\n"
    + _list(LM_POLICIES)
)

# The command list: one place to see every subcommand.
app.command("generate-teacher-data")(generate_teacher_data)
app.command("select")(select)
app.command("distill")(distill)
app.command("cascade")(cascade)
app.command("evaluate")(evaluate)
app.command("serve")(serve)
app.command("doctor")(doctor)


def main() -> None:
    app()
