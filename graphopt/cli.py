"""The ``graphopt`` command: a thin layer over ``graphopt.api`` and the only module that prints.

Exit codes: 0 ok; 1 a validation gate failed; 2 bad input or usage; 3 a pass failed internally.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.markup import escape
from rich.table import Table

from graphopt import __version__
from graphopt.errors import GraphoptError, UserError

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)

app = typer.Typer(
    name="graphopt",
    help="Optimize ONNX models (cleanup, quantization, pruning, low-rank, fp16, distillation, partitioning) "
         "and prove the result with ONNX Runtime.\n\n"
         "Exit codes: 0 ok, 1 a validation gate failed, 2 bad input or usage, 3 a pass failed internally.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


class RichProgress:
    """Progress bars on stderr for long work (calibration, comparison, latency, training)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    @contextlib.contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Any]:
        if not self.enabled:
            from graphopt.context import NullProgress

            with NullProgress().task(description, total) as t:
                yield t
            return
        progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), console=err_console, transient=True)
        with progress:
            task_id = progress.add_task(description, total=total)

            class _Task:
                def advance(self, amount: float = 1) -> None:
                    progress.advance(task_id, amount)

                def update(self, *, total: float | None = None, description: str | None = None) -> None:
                    kwargs: dict[str, Any] = {}
                    if total is not None:
                        kwargs["total"] = total
                    if description is not None:
                        kwargs["description"] = description
                    progress.update(task_id, **kwargs)

            yield _Task()


def _fail(exc: GraphoptError) -> typer.Exit:
    err_console.print(f"error: {exc}", soft_wrap=True, markup=False)
    return typer.Exit(exc.exit_code)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except GraphoptError as exc:
        raise _fail(exc) from None
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        raise typer.Exit(130) from None


def _split(text: str | None) -> list[str]:
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def _ints(text: str | None, what: str) -> list[int]:
    try:
        values = [int(t) for t in _split(text)]
    except ValueError:
        raise UserError(f"{what} expects comma-separated positive integers, e.g. 1,8; got {text!r}") from None
    if any(v <= 0 for v in values):
        raise UserError(f"{what} expects positive integers; got {text!r}")
    return values


def _shapes(items: list[str] | None) -> dict[str, tuple[int, ...]]:
    from graphopt.data import parse_shape

    return dict(parse_shape(s) for s in items or [])


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:  # the libraries' own warnings (e.g. about the malformed input we then refuse) are noise here
        for name in ("onnx_ir", "onnxscript"):
            logging.getLogger(name).setLevel(logging.ERROR)


def _print_report(data: dict[str, Any]) -> None:
    from graphopt.report import rich_renderables

    for renderable in rich_renderables(data):
        console.print(renderable)
    if data.get("message"):
        console.print(("[red]" if not data.get("passed") else "") + data["message"], markup=True)


def _write_reports(report: Any, json_path: Path | None, html_path: Path | None, md_path: Path | None = None) -> None:
    if md_path:
        report.write_markdown(md_path)
        console.print(f"markdown report: {md_path}")
    if json_path:
        report.write_json(json_path)
        console.print(f"report: {json_path}")
    if html_path:
        report.write_html(html_path)
        console.print(f"html report: {html_path}")


ModelArg = Annotated[Path, typer.Argument(help="ONNX model file (external data beside it is followed).",
                                          show_default=False)]
RunModelArg = Annotated[Path, typer.Argument(
    help="ONNX model file, or a framework source exported first: torch:MODULE:FACTORY (with --shape NAME=DIMS "
         "for each input) or tf:SAVED_MODEL_DIR|MODEL.keras|MODEL.h5.", show_default=False)]
DataOpt = Annotated[Optional[str], typer.Option(
    "--data", help="Data: FILE.npz (keys = input names, optional 'labels'), a folder of .npz files, or "
                   "module:function returning batches. Without it, synthetic inputs are made from the model.")]
ShapeOpt = Annotated[Optional[list[str]], typer.Option(
    "--shape", help="Pin an input's shape for synthetic data and FLOPs, e.g. input=1x3x224x224 (repeatable).")]
ProvidersOpt = Annotated[Optional[str], typer.Option(
    "--providers", help="Execution providers for validation and latency, e.g. cpu or cpu,cuda. [default: cpu]")]


@app.command()
def run(
    model: RunModelArg,
    passes: Annotated[Optional[str], typer.Option("--passes", "-p", help="Comma-separated passes in order, e.g. cleanup,quant (see `graphopt passes`).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Where to write the optimized model. [default: MODEL.opt.onnx]")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Pass option PASS.OPTION=VALUE (repeatable); overrides --config.")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="Pipeline file (TOML): passes, [options.PASS], [data], [validate].")] = None,
    data: DataOpt = None,
    eval_data: Annotated[Optional[str], typer.Option("--eval-data", help="Data for validation if it differs from --data (same forms).")] = None,
    shape: ShapeOpt = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help="Batch size for calibration and comparison. [default: 32]", min=1)] = None,
    providers: ProvidersOpt = None,
    max_accuracy_drop: Annotated[Optional[float], typer.Option("--max-accuracy-drop", help="Gate: most points of accuracy (with labels) or of top-1 agreement the output may lose.")] = None,
    max_latency_ratio: Annotated[Optional[float], typer.Option("--max-latency-ratio", help="Gate: most output/input p50 latency ratio, per provider and batch.")] = None,
    latency_batch: Annotated[Optional[str], typer.Option("--latency-batch", help="Batch sizes to time, e.g. 1,8. [default: 1]")] = None,
    keep_failed: Annotated[bool, typer.Option("--keep-failed", help="Write the output model even when a gate fails.")] = False,
    check_each_pass: Annotated[bool, typer.Option("--check-each-pass", help="Run the model before and after every pass on the data; fail naming the pass whose outputs moved beyond its tolerance.")] = False,
    no_validate: Annotated[bool, typer.Option("--no-validate", help="Skip validation (no agreement, latency or gates).")] = False,
    no_latency: Annotated[bool, typer.Option("--no-latency", help="Validate outputs but do not time the models.")] = False,
    eval_samples: Annotated[int, typer.Option("--eval-samples", help="Most samples used to compare outputs.", min=1)] = 1000,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write the report as JSON.")] = None,
    html: Annotated[Optional[Path], typer.Option("--html", help="Write the report as a self-contained HTML page.")] = None,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", help="Write the report as Markdown tables.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for synthetic data and passes. [default: 0]")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables (errors still print).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what each step does.")] = False,
) -> None:
    """Optimize MODEL with a pipeline of passes, validate it in ONNX Runtime, write it and a report.

    Examples:

      graphopt run model.onnx --passes cleanup -o out.onnx

      graphopt run model.onnx --passes cleanup,quant --data calib.npz --eval-data test.npz --max-accuracy-drop 1

      graphopt run model.onnx --config pipeline.toml --set quant.calibration=entropy --report r.json --html r.html
    """
    _setup_logging(verbose)
    with _errors():
        from graphopt.api import optimize
        from graphopt.config import PipelineFile, load_pipeline_file
        from graphopt.options import parse_assignments

        cfg = load_pipeline_file(config) if config else PipelineFile()
        names = _split(passes) if passes else (cfg.passes or [])
        if not names:
            raise UserError("no passes given; use --passes cleanup,... or a --config file with passes = [...]")
        pins = {k: tuple(v) for k, v in (cfg.data.get("shapes") or {}).items()} | _shapes(shape)
        from graphopt.api import FRAMEWORK_PREFIXES

        if output is None and str(model).startswith(FRAMEWORK_PREFIXES):
            raise UserError(f"give the output file with -o when the model is a framework source ({model})")
        out = output or model.with_suffix(".opt.onnx")
        cmd = "graphopt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        vcfg = cfg.validate
        result = optimize(
            model, names, cfg.options, data if data is not None else cfg.data.get("path"),
            eval_data=eval_data if eval_data is not None else cfg.data.get("eval"),
            output=out, set_options=parse_assignments(set_ or []),
            providers=providers or vcfg.get("providers", ["cpu"]),
            validate=not no_validate and vcfg.get("enabled", True), measure_speed=not no_latency,
            max_accuracy_drop=max_accuracy_drop if max_accuracy_drop is not None else vcfg.get("max_accuracy_drop"),
            max_latency_ratio=max_latency_ratio if max_latency_ratio is not None else vcfg.get("max_latency_ratio"),
            latency_batches=_ints(latency_batch, "--latency-batch") if latency_batch else vcfg.get("latency_batches", [1]),
            check_each_pass=check_each_pass or bool(cfg.check_each_pass),
            shapes=pins, batch_size=batch_size or cfg.data.get("batch_size", 32),
            eval_samples=cfg.data.get("eval_samples", eval_samples),
            seed=seed if seed is not None else (cfg.seed or 0),
            keep_failed=keep_failed or vcfg.get("keep_failed", False),
            progress=RichProgress(not quiet), command=cmd,
        )
        rep = result.report
        if not quiet:
            _print_report(rep.data)
        _write_reports(rep, report, html, markdown)
        if rep.data["output"]["written"]:
            console.print(f"wrote {out}")
        elif not rep.passed:
            console.print(f"not written: {out} (a gate failed; --keep-failed writes it anyway)")
        raise typer.Exit(rep.data["exit_code"])


@app.command()
def passes() -> None:
    """List every pass with its options, types, defaults and one-line docs."""
    from graphopt.options import describe
    from graphopt.registry import all_passes

    for cls in all_passes():
        console.print(f"[bold]{cls.name}[/bold] — {cls.summary}")
        infos = describe(cls.Options)
        if not infos:
            console.print("    (no options)")
        table = Table(show_header=True, box=None, padding=(0, 2, 0, 4))
        for col in ("option", "type", "default", "description"):
            table.add_column(col)
        for info in infos:
            table.add_row(f"{cls.name}.{info.name}", info.type_name, json.dumps(info.default), info.help)
        if infos:
            console.print(table)
        console.print()


@app.command()
def inspect(
    model: ModelArg,
    shape: ShapeOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show inputs/outputs, opsets, IR version, op histogram, parameters, size and FLOPs by op type."""
    _setup_logging(False)
    with _errors():
        from graphopt.describe import describe_model

        info = describe_model(model, _shapes(shape))
        if as_json:
            console.print_json(json.dumps(info))
            return
        console.print(f"[bold]{model}[/bold]  IR version {info['ir_version']}, opsets "
                      + ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in info["opsets"].items())
                      + (f", producer {info['producer']}" if info.get("producer") else ""))
        io = Table(title="Inputs and outputs", title_justify="left")
        for col in ("kind", "name", "type", "shape"):
            io.add_column(col)
        for kind in ("inputs", "outputs"):
            for v in info[kind]:
                io.add_row(kind[:-1], escape(v["name"]), v["dtype"], escape(v["shape"]))
        console.print(io)
        from graphopt.stats import format_bytes, format_count

        console.print(f"parameters {format_count(info['parameters'])} · weights {format_bytes(info['weight_bytes'])}"
                      f" · file {format_bytes(info['file_bytes'])} · nodes {info['nodes']}"
                      f" · FLOPs/sample {format_count(info['flops'])}"
                      + ("" if info.get("flops_exact", True) else " (approximate: some shapes unknown)"))
        ops = Table(title="Operators", title_justify="left")
        for col in ("op", "count", "FLOPs/sample", "share"):
            ops.add_column(col, justify="right" if col != "op" else "left")
        total = info["flops"] or 0
        for op, count in info["op_histogram"].items():
            f = info["flops_by_op"].get(op)
            ops.add_row(op, str(count), format_count(f) if f is not None else "",
                        f"{100 * f / total:.1f}%" if f and total else "")
        console.print(ops)


@app.command()
def validate(
    reference: Annotated[Path, typer.Argument(help="The reference (original) model.", show_default=False)],
    candidate: Annotated[Path, typer.Argument(help="The candidate (optimized) model.", show_default=False)],
    data: DataOpt = None,
    shape: ShapeOpt = None,
    providers: ProvidersOpt = None,
    max_accuracy_drop: Annotated[Optional[float], typer.Option("--max-accuracy-drop", help="Gate: most points of accuracy or top-1 agreement lost.")] = None,
    max_latency_ratio: Annotated[Optional[float], typer.Option("--max-latency-ratio", help="Gate: most candidate/reference p50 latency ratio.")] = None,
    latency_batch: Annotated[Optional[str], typer.Option("--latency-batch", help="Batch sizes to time, e.g. 1,8. [default: 1]")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size for comparison.", min=1)] = 32,
    eval_samples: Annotated[int, typer.Option("--eval-samples", help="Most samples compared.", min=1)] = 1000,
    no_latency: Annotated[bool, typer.Option("--no-latency", help="Compare outputs only.")] = False,
    backend: Annotated[str, typer.Option("--backend", help="threads (in this process) or ray (actors; a Ray cluster places them; needs graphopt[ray]).")] = "threads",
    replicas: Annotated[int, typer.Option("--replicas", help="With --backend ray: actors per model sharing each batch (data-parallel).", min=1)] = 1,
    report: Annotated[Optional[Path], typer.Option("--report", help="Write the report as JSON.")] = None,
    html: Annotated[Optional[Path], typer.Option("--html", help="Write the report as HTML.")] = None,
    markdown: Annotated[Optional[Path], typer.Option("--markdown", help="Write the report as Markdown tables.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or tables.")] = False,
) -> None:
    """Check a candidate against its reference: agreement, accuracy, latency, size and gates."""
    with _errors():
        from graphopt.api import validate_models

        rep = validate_models(reference, candidate, data, providers=providers or "cpu",
                              max_accuracy_drop=max_accuracy_drop, max_latency_ratio=max_latency_ratio,
                              latency_batches=_ints(latency_batch, "--latency-batch") if latency_batch else [1],
                              shapes=_shapes(shape), batch_size=batch_size, eval_samples=eval_samples,
                              measure_speed=not no_latency, backend=backend, replicas=replicas,
                              progress=RichProgress(not quiet),
                              command="graphopt " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
        if not quiet:
            _print_report(rep.data)
        _write_reports(rep, report, html, markdown)
        raise typer.Exit(rep.data["exit_code"])


@app.command()
def bench(
    model: ModelArg,
    data: DataOpt = None,
    shape: ShapeOpt = None,
    providers: ProvidersOpt = None,
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes, e.g. 1,8,64.")] = "1",
    repeat: Annotated[int, typer.Option("--repeat", help="Timed runs per setting (after warm-up).", min=1)] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Measure ONNX Runtime latency (p50/p90) and throughput of MODEL per provider and batch size."""
    with _errors():
        from graphopt.api import bench_model
        from graphopt.runtime import short_name

        rows = bench_model(model, data, providers=providers or "cpu", batches=_ints(batch, "--batch"),
                           shapes=_shapes(shape), repeat=repeat, progress=RichProgress(not as_json))
        if as_json:
            console.print_json(json.dumps(rows))
            return
        t = Table(title=f"Latency of {model}", title_justify="left")
        for col in ("provider", "batch", "p50", "p90", "samples/s", "runs"):
            t.add_column(col, justify="right")
        for r in rows:
            t.add_row(short_name(r["provider"]), str(r["batch"]), f"{r['p50_ms']:.3f} ms", f"{r['p90_ms']:.3f} ms",
                      f"{r['samples_per_s']:.1f}", str(r["runs"]))
        console.print(t)


def _register_commands() -> None:
    import importlib
    import pkgutil

    import graphopt.commands as commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"graphopt.commands.{info.name}")
        module.register(app)


_register_commands()


def version_callback(value: bool) -> None:
    if value:
        console.print(f"graphopt {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=version_callback, is_eager=True,
                                                 help="Print the version and exit.")] = False) -> None:
    """graphopt: optimize ONNX models and prove the result with ONNX Runtime."""


def main() -> None:
    os.environ.setdefault("ORT_LOGGING_LEVEL", "3")
    app()


if __name__ == "__main__":
    main()
