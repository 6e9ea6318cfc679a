"""`graphopt distill` (train a student ONNX model to match a teacher) and `graphopt setup-train`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

# Option types are declared here rather than taken from graphopt.cli: under `python -m graphopt.cli` that
# module is __main__ while this one is imported, and graphopt.cli would be a second copy.
DataOpt = Annotated[str, typer.Option(
    "--data", help="Training data: FILE.npz (keys = input names, optional 'labels'), a folder of .npz files, or "
                   "module:function.", show_default=False)]
ShapeOpt = Annotated[Optional[list[str]], typer.Option(
    "--shape", help="Pin an input's shape, e.g. input=1x3x224x224 (repeatable).")]
ProvidersOpt = Annotated[Optional[str], typer.Option(
    "--providers", help="Execution providers for the teacher outputs and the validation. [default: cpu]")]


def register(app: typer.Typer) -> None:
    @app.command("setup-train")
    def setup_train(
        path: Annotated[Optional[Path], typer.Option("--path", help="Where to create the environment. "
                        "[default: .venv-train in a source checkout, else ~/.cache/graphopt/venv-train; "
                        "or $GRAPHOPT_TRAIN_ENV]")] = None,
        python: Annotated[Optional[str], typer.Option("--python", help="Python 3.10/3.11 to build it with. "
                          "[default: this one if <= 3.11, else python3.11 on PATH]")] = None,
        force: Annotated[bool, typer.Option("--force", help="Delete and re-create it.")] = False,
    ) -> None:
        """Create the training environment distillation runs in (onnxruntime-training 1.19.2 + torch CPU).

        onnxruntime-training installs its own `onnxruntime` module, so it gets its own virtual environment.
        Idempotent: returns at once when the environment is already complete. The first run takes about a
        minute (pip).
        """
        from graphopt import cli

        with cli._errors():
            from graphopt.train import env

            target = path or env.default_env_dir()
            if env.env_is_ready(target.absolute()) and not force:
                cli.console.print(f"training environment ready: {target}")
                return
            done = env.setup_env(target, python=python, force=force,
                                 say=lambda msg: cli.err_console.print(msg, markup=False))
            cli.console.print(f"training environment ready: {done}")

    @app.command("distill")
    def distill(
        teacher: Annotated[Path, typer.Argument(help="The teacher ONNX model.", show_default=False)],
        student: Annotated[Path, typer.Option("--student", help="The student ONNX model to train (same inputs "
                           "and outputs as the teacher).", show_default=False)],
        output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the trained student.",
                          show_default=False)],
        data: DataOpt,
        eval_data: Annotated[Optional[str], typer.Option("--eval-data", help="Data to compare the trained "
                             "student with the teacher on (accuracy with labels). [default: --data]")] = None,
        epochs: Annotated[Optional[int], typer.Option("--epochs", help="Training epochs. [default: 20]",
                          min=1)] = None,
        temperature: Annotated[Optional[float], typer.Option("--temperature", "-T", help="Softmax "
                               "temperature. [default: 4]")] = None,
        alpha: Annotated[Optional[float], typer.Option("--alpha", help="Weight of the teacher term (1-alpha: "
                         "cross-entropy on labels). [default: 0.9 with labels, 1 without]")] = None,
        lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate. [default: 0.001]")] = None,
        batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Training batch size. "
                              "[default: 32]", min=1)] = None,
        checkpoint_dir: Annotated[Optional[Path], typer.Option("--checkpoint-dir", help="Checkpoint every "
                                  "epoch (and the teacher outputs) here. [default: OUTPUT.distill/]")] = None,
        resume: Annotated[bool, typer.Option("--resume", help="Continue from the last epoch in the "
                          "checkpoint folder.")] = False,
        set_: Annotated[Optional[list[str]], typer.Option("--set", help="Other distill options, "
                        "distill.OPTION=VALUE (see `graphopt passes`).")] = None,
        shape: ShapeOpt = None,
        providers: ProvidersOpt = None,
        max_accuracy_drop: Annotated[Optional[float], typer.Option("--max-accuracy-drop", help="Gate: most "
                                     "points of accuracy the student may lose against the teacher.")] = None,
        no_validate: Annotated[bool, typer.Option("--no-validate", help="Skip the comparison with the "
                               "teacher.")] = False,
        no_latency: Annotated[bool, typer.Option("--no-latency", help="Compare outputs but do not time "
                              "the models.")] = False,
        report: Annotated[Optional[Path], typer.Option("--report", help="Write the report as JSON.")] = None,
        html: Annotated[Optional[Path], typer.Option("--html", help="Write the report as HTML.")] = None,
        seed: Annotated[int, typer.Option("--seed", help="Seed for the split and the shuffling.")] = 0,
        quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables.")] = False,
        verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each epoch.")] = False,
    ) -> None:
        """Train STUDENT to match TEACHER (knowledge distillation with ONNX Runtime training).

        The loss is alpha*T^2*KL(teacher/T || student/T) + (1-alpha)*CE(student, labels) on classification
        outputs and MSE on others. Needs the training environment (`graphopt setup-train`).

        Examples:

          graphopt distill teacher.onnx --student pruned.onnx --data train.npz --eval-data test.npz -o out.onnx

          graphopt distill teacher.onnx --student pruned.onnx --data train.npz -o out.onnx --epochs 40 --resume
        """
        from graphopt import cli

        cli._setup_logging(verbose)
        with cli._errors():
            from graphopt.api import optimize
            from graphopt.errors import UserError
            from graphopt.options import parse_assignments

            sets = parse_assignments(set_ or [])
            other = sorted(set(sets) - {"distill"})
            if other:
                raise UserError(f"--set here takes distill.OPTION=VALUE only; got '{other[0]}.…'")
            options = dict(sets.get("distill", {}))
            flags = {"epochs": epochs, "temperature": temperature, "alpha": alpha, "lr": lr,
                     "batch_size": batch_size}
            options.update({k: str(v) for k, v in flags.items() if v is not None})
            options["student"] = str(student)
            options["checkpoint_dir"] = str(checkpoint_dir or output.with_name(output.name + ".distill"))
            if resume:
                options["resume"] = "true"
            result = optimize(
                teacher, ["distill"], None, data, eval_data=eval_data, output=output,
                set_options={"distill": options}, providers=providers or ["cpu"], validate=not no_validate,
                measure_speed=not no_latency, max_accuracy_drop=max_accuracy_drop, shapes=cli._shapes(shape),
                seed=seed, progress=cli.RichProgress(not quiet),
                command="graphopt " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
            rep = result.report
            if not quiet:
                cli._print_report(rep.data)
            cli._write_reports(rep, report, html)
            if rep.data["output"]["written"]:
                cli.console.print(f"wrote {output}")
            elif not rep.passed:
                cli.console.print(f"not written: {output} (a gate failed)")
            raise typer.Exit(rep.data["exit_code"])
