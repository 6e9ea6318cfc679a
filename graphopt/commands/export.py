"""``graphopt export torch|tf``: framework model → ONNX file, checked against the framework.

Exit codes as everywhere: 0 ok, 1 ONNX Runtime disagrees with the framework beyond tolerance (nothing
written unless --keep-failed), 2 bad input or a missing extra. Frameworks are imported only when a
command runs, so ``graphopt`` starts without torch or tensorflow.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from graphopt.errors import GraphoptError

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

export_app = typer.Typer(
    name="export",
    help="Export a PyTorch or TensorFlow model to ONNX and check it against the framework in ONNX Runtime.",
    no_args_is_help=True,
    rich_markup_mode="rich",
)

OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Where to write the ONNX model.", show_default=False)]
OpsetOpt = Annotated[int, typer.Option("--opset", help="ONNX opset to export (exporters may write a newer one; "
                                                      "a note says so).", min=7)]
AtolOpt = Annotated[float, typer.Option("--atol", help="Check tolerance: absolute part of |onnx - framework| <= "
                                                      "atol + rtol*|framework|.", min=0.0)]
RtolOpt = Annotated[float, typer.Option("--rtol", help="Check tolerance: relative part.", min=0.0)]
SeedOpt = Annotated[int, typer.Option("--seed", help="Seed of the random check inputs.")]
NoCheckOpt = Annotated[bool, typer.Option("--no-check", help="Do not run the framework and ONNX Runtime side by side.")]
KeepFailedOpt = Annotated[bool, typer.Option("--keep-failed", help="Write the model even when the check fails.")]
ReportOpt = Annotated[Optional[Path], typer.Option("--report", help="Write what happened (exporter, notes, every "
                                                                   "max difference) as JSON.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the result line and errors.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log what the exporter does.")]


@contextlib.contextmanager
def _errors(report: Path | None, quiet: bool) -> Iterator[None]:
    """Print a graphopt error as one line and exit with its code; a check failure shows its table first."""
    from graphopt.export import ExportMismatch

    try:
        yield
    except ExportMismatch as exc:
        if not quiet:
            _print_result(exc.result)
        if report:
            exc.result.write_json(report)
        err_console.print(f"error: {exc}", soft_wrap=True, markup=False)
        raise typer.Exit(exc.exit_code) from None
    except GraphoptError as exc:
        err_console.print(f"error: {exc}", soft_wrap=True, markup=False)
        raise typer.Exit(exc.exit_code) from None


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def _fmt_shape(shape: list[Any]) -> str:
    return "[" + ",".join("?" if d is None else str(d) for d in shape) + "]"


def _print_result(result: Any) -> None:
    console.print(f"exported {escape(result.source)} with the [bold]{result.exporter}[/bold] exporter "
                  f"(opset {result.opset})")
    io = result.io()
    for kind in ("inputs", "outputs"):
        for v in io[kind]:
            console.print(f"  {kind[:-1]:6} {escape(v['name'])} {v['dtype']}{escape(_fmt_shape(v['shape']))}")
    for note in result.notes:
        console.print(f"note: {escape(note)}", soft_wrap=True)
    check = result.check
    if check is None:
        console.print("not checked (--no-check)")
        return
    table = Table(title=f"ONNX Runtime vs {check.framework}", title_justify="left")
    for col in ("inputs", "output", "shape", "max |diff|", "max |ref|", "ok"):
        table.add_column(col, justify="right" if col.startswith("max") else "left")
    for case in check.cases:
        for o in case.outputs:
            table.add_row(escape(case.shapes), escape(o.name), escape(_fmt_shape(list(o.shape))),
                          f"{o.max_abs:.3g}", f"{o.ref_max_abs:.3g}", "yes" if o.passed else f"NO {escape(o.problem)}")
    console.print(table)


def _finish(result: Any, report: Path | None, quiet: bool) -> None:
    if not quiet:
        _print_result(result)
    if report:
        result.write_json(report)
    if result.check is not None:
        console.print(f"max |diff| {result.check.max_abs:.3g} (passes when |diff| <= {result.check.atol:g} + "
                      f"{result.check.rtol:g}·|{result.check.framework}|)")
    console.print(f"wrote {result.path}")


@export_app.command("torch")
def export_torch(
    factory: Annotated[str, typer.Argument(help="MODULE:FACTORY — MODULE importable from the current folder or a .py "
                                                "path; FACTORY returns an nn.Module (or (module, example_inputs)).",
                                           show_default=False)],
    output: OutputOpt,
    input_: Annotated[Optional[list[str]], typer.Option(
        "--input", "-i", help="A forward argument, in order: NAME=1x3x224x224[:dtype] (float32 default; int64 for "
                              "token ids). Repeatable.")] = None,
    dynamic_batch: Annotated[bool, typer.Option("--dynamic-batch", help="Axis 0 of every input becomes the "
                                                                        "symbolic dimension 'batch'.")] = False,
    dynamic: Annotated[Optional[list[str]], typer.Option(
        "--dynamic", help="Another symbolic axis: NAME:AXIS=DIM, e.g. input_ids:1=seq (same DIM = same size). "
                          "Repeatable.")] = None,
    opset: OpsetOpt = 18,
    exporter: Annotated[str, typer.Option("--exporter", help="auto (dynamo, TorchScript if dynamo fails) | dynamo | "
                                                             "torchscript.")] = "auto",
    output_names: Annotated[Optional[str], typer.Option("--output-names", help="Comma-separated output names. "
                                                        "\\[default: output, output_0.., or the dict's keys]")] = None,
    atol: AtolOpt = 1e-4,
    rtol: RtolOpt = 1e-3,
    seed: SeedOpt = 0,
    no_check: NoCheckOpt = False,
    keep_failed: KeepFailedOpt = False,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Export a PyTorch model made by MODULE:FACTORY to ONNX (dynamo exporter, TorchScript fallback).

    Examples:

      graphopt export torch mymodels:make_resnet --input input=1x3x224x224 --dynamic-batch -o resnet.onnx

      graphopt export torch models/bert.py:build --input input_ids=1x128:int64 --input attention_mask=1x128:int64
        --dynamic-batch --dynamic input_ids:1=seq --dynamic attention_mask:1=seq -o bert.onnx
    """
    _setup_logging(verbose)
    with _errors(report, quiet):
        from graphopt.errors import UserError
        from graphopt.export import export_factory, parse_dynamic, parse_input

        if exporter not in ("auto", "dynamo", "torchscript"):
            raise UserError(f"--exporter must be auto, dynamo or torchscript; got {exporter!r}")
        decls = [parse_input(t) for t in input_ or []]
        if len({d.name for d in decls}) != len(decls):
            raise UserError("--input names must be unique")
        extra = [parse_dynamic(t) for t in dynamic or []]
        if extra and not decls:
            raise UserError("--dynamic needs the inputs declared with --input")
        axes: dict[str, dict[int, str]] = {}
        for name, axis, dim in extra:
            if name not in {d.name for d in decls}:
                raise UserError(f"--dynamic names input '{name}', which is not declared with --input "
                                f"({', '.join(d.name for d in decls)})")
            axes.setdefault(name, {})[axis] = dim
        names = [n.strip() for n in output_names.split(",") if n.strip()] if output_names else None
        result = export_factory(factory, decls or None, dynamic_batch=dynamic_batch, dynamic_axes=axes,
                                opset=opset, exporter=exporter, output_names=names, output=output,
                                check=not no_check, atol=atol, rtol=rtol, seed=seed, keep_failed=keep_failed)
        _finish(result, report, quiet)


@export_app.command("tf")
def export_tf(
    model: Annotated[str, typer.Argument(help="A SavedModel folder, a .keras file or a .h5 file.", show_default=False)],
    output: OutputOpt,
    input_: Annotated[Optional[list[str]], typer.Option(
        "--input", "-i", help="Shape to check an input at where the model leaves a non-batch dimension unknown: "
                              "NAME=2x128. Repeatable.")] = None,
    signature: Annotated[Optional[str], typer.Option("--signature", help="SavedModel signature. "
                                                                         "\\[default: serving_default]")] = None,
    opset: OpsetOpt = 18,
    atol: AtolOpt = 1e-4,
    rtol: RtolOpt = 1e-3,
    seed: SeedOpt = 0,
    no_check: NoCheckOpt = False,
    keep_failed: KeepFailedOpt = False,
    report: ReportOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Convert a TensorFlow/Keras model to ONNX with tf2onnx (needs graphopt\\[tf]).

    Examples:

      graphopt export tf saved_model_dir -o model.onnx

      graphopt export tf classifier.keras -o classifier.onnx --atol 1e-5
    """
    _setup_logging(verbose)
    with _errors(report, quiet):
        from graphopt.export import from_tf, parse_input

        shapes = {d.name: d.shape for d in (parse_input(t) for t in input_ or [])}
        result = from_tf(model, input_shapes=shapes, opset=opset, signature=signature, output=output,
                         check=not no_check, atol=atol, rtol=rtol, seed=seed, keep_failed=keep_failed)
        _finish(result, report, quiet)


def register(app: typer.Typer) -> None:
    app.add_typer(export_app, name="export")
