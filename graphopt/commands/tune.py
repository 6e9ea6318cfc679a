"""``graphopt tune MODEL``: find the fastest ONNX Runtime settings and write them as ``MODEL.ort.json``.

Exit codes as everywhere: 0 settings written (candidates that failed are in the table, not errors),
2 bad input or nothing could be tuned at all (e.g. only ``--providers cuda`` on a build without CUDA;
nothing is written then).
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(highlight=False)


def _fmt_ms(v: float | None) -> str:
    return "" if v is None else f"{v:.3f} ms"


def _print_result(data: dict[str, Any], show_candidates: bool) -> None:
    if show_candidates and data["candidates"]:
        t = Table(title="Candidates (each tried on top of the best so far)", title_justify="left")
        for col in ("provider", "batch", "candidate", "p50", "best so far", "status", "note"):
            t.add_column(col, justify="right" if col in ("batch", "p50", "best so far") else "left")
        for r in data["candidates"]:
            t.add_row(r["provider"], str(r["batch"]), escape(r["candidate"]), _fmt_ms(r["p50_ms"]),
                      _fmt_ms(r["best_so_far_p50_ms"]), r["status"], escape(r["note"] or ""))
        console.print(t)
    t = Table(title="Tuned settings (defaults vs tuned, interleaved runs)", title_justify="left")
    for col in ("provider", "batch", "defaults p50", "tuned p50", "ratio", "settings"):
        t.add_column(col, justify="left" if col in ("provider", "settings") else "right")
    for g in data["results"]:
        ratio = "" if g["ratio"] is None else f"{g['ratio']:.3f}×"
        text = g["settings"] if g["status"] == "tuned" else f"skipped: {g['note']}"
        if g["status"] == "tuned" and g["note"]:
            text += f" ({g['note']})"
        t.add_row(g["provider"], str(g["batch"]), _fmt_ms(g["default_p50_ms"]), _fmt_ms(g["tuned_p50_ms"]), ratio,
                  escape(text or ""))
    console.print(t)
    console.print(f"searched for {data['elapsed_s']:.1f} s of a {data['budget_s']:g} s budget")


def tune_command(
    model: Annotated[Path, typer.Argument(help="ONNX model file.", show_default=False)],
    providers: Annotated[str, typer.Option("--providers", help="Providers to tune, e.g. cpu or cpu,cuda. A "
                                           "provider this onnxruntime lacks is reported as skipped.")] = "cpu",
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes to tune for, e.g. 1,8,64.")] = "1",
    budget: Annotated[float, typer.Option("--budget", help="Time budget for the whole search, in seconds.")] = 120.0,
    data: Annotated[Optional[str], typer.Option("--data", help="Inputs to time on: FILE.npz, a folder, or "
                                                               "module:function (default: synthetic).")] = None,
    shape: Annotated[Optional[list[str]], typer.Option("--shape", help="Pin an input's shape for synthetic "
                                                                       "inputs, e.g. input=1x3x224x224.")] = None,
    search: Annotated[Optional[str], typer.Option("--search", help="Only these dimensions, comma-separated "
                                                                   "(default: all for each provider).")] = None,
    warmup: Annotated[int, typer.Option("--warmup", help="Untimed runs per candidate (>= 1).")] = 5,
    repeat: Annotated[int, typer.Option("--repeat", help="Most timed runs per candidate (>= 3).")] = 30,
    min_gain: Annotated[float, typer.Option("--min-gain", help="Fraction faster a setting must be to be kept "
                                                               "(0 <= x < 1).")] = 0.03,
    tolerance: Annotated[Optional[float], typer.Option("--tolerance", help="Most max abs output difference vs the "
                                                                           "defaults, relative to the largest output "
                                                                           "magnitude. [default: 1e-3; 1e-2 fp16]"
                                                       )] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Settings file. [default: MODEL.ort.json "
                                                                          "beside the model]")] = None,
    report: Annotated[Optional[Path], typer.Option("--report",
                                                   help="Write every candidate and result as JSON.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of tables.")] = False,
    all_candidates: Annotated[bool, typer.Option("--candidates", help="Also print every candidate tried.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or tables.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log the search.")] = False,
) -> None:
    """Search execution-provider and session settings for MODEL and write the fastest as MODEL.ort.json.

    Each candidate is loaded as an application would load it, warmed up, timed in interleaved runs
    against the best so far, and its outputs are checked against ORT's defaults. Candidates that fail
    or disagree are recorded and skipped. `graphopt bench` and `graphopt validate` use the file.

    Examples:

      graphopt tune model.onnx --providers cpu --batch 1,8 --budget 60

      graphopt tune model.onnx --providers cuda --batch 1,8,64 --report tune.json
    """
    from graphopt.cli import RichProgress, _errors, _ints, _setup_logging, _shapes, _split

    _setup_logging(verbose)
    with _errors():
        from graphopt.data import input_specs, open_data
        from graphopt.errors import UserError
        from graphopt.model_io import load_model
        from graphopt.tune import SearchConfig, default_tolerance, save_settings, split_providers, tune
        from graphopt.validate import latency_inputs

        batches = _ints(batch, "--batch")
        if not batches:
            raise UserError("--batch expects comma-separated positive integers, e.g. 1,8")
        if budget <= 0:
            raise UserError(f"--budget expects a positive number of seconds; got {budget:g}")
        if warmup < 1:
            raise UserError(f"--warmup expects at least 1 run; got {warmup}")
        if repeat < 3:
            raise UserError(f"--repeat expects at least 3 runs; got {repeat}")
        if not 0.0 <= min_gain < 1.0:
            raise UserError(f"--min-gain expects a fraction in [0, 1); got {min_gain:g}")
        if tolerance is not None and tolerance < 0:
            raise UserError(f"--tolerance expects a non-negative number; got {tolerance:g}")
        split_providers(providers)  # unknown names fail before the model is read
        ir_model = load_model(model)
        specs = input_specs(ir_model)
        source = open_data(data, ir_model, shapes=_shapes(shape), synthetic_rows=max(batches), batch_size=max(batches))
        for b in batches:
            latency_inputs(source, specs, b)  # bad data fails now, not in the middle of the search
        tol = tolerance if tolerance is not None else default_tolerance(ir_model)
        del ir_model
        cache: dict[int, Any] = {}

        def inputs_for(b: int) -> Any:
            if b not in cache:
                cache[b] = latency_inputs(source, specs, b)
            return cache[b]

        config = SearchConfig(budget_s=budget, warmup=warmup, repeat=repeat, min_repeat=min(5, repeat),
                              min_gain=min_gain, tolerance=tol, only=_split(search) or None)
        result = tune(model, providers, batches, inputs_for, config, progress=RichProgress(not (quiet or as_json)))
        data_out = result.to_dict()
        data_out["command"] = "graphopt " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        if not result.tuned:
            reasons = "; ".join(sorted({str(g.reason) for g in result.groups}))
            raise UserError(f"nothing could be tuned ({reasons}); no settings written")
        written = save_settings(model, result, path=output)
        data_out["settings_file"] = str(written)
        if report:
            report.parent.mkdir(parents=True, exist_ok=True)
            report.write_text(json.dumps(data_out, indent=2) + "\n", encoding="utf-8")
        if as_json:
            console.print_json(json.dumps(data_out))
            return
        if not quiet:
            _print_result(data_out, all_candidates)
        console.print(f"wrote {written}")
        if report:
            console.print(f"report: {report}")


def register(app: typer.Typer) -> None:
    app.command("tune")(tune_command)
