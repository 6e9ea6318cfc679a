"""``graphopt exec DIR``: run a partitioned model's stages chained over data, and say how fast and how busy.

It streams the data through :class:`graphopt.stages.StagePipeline` (threads or Ray), so stages overlap
across batches and micro-batches; it can write the outputs to an .npz and compare them with the
unpartitioned model.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from rich.console import Console


def _specs(manifest: dict[str, Any]) -> list[Any]:
    from graphopt.data import InputSpec

    specs = []
    for entry in manifest.get("model_inputs", []):
        shape = entry.get("shape")
        specs.append(InputSpec(entry["name"], np.dtype(entry["dtype"]),
                               None if shape is None else tuple(shape)))
    return specs


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".graphopt-", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Errors a user can cause: one line on stderr and the error's exit code (as the other commands do)."""
    from graphopt.errors import GraphoptError

    try:
        yield
    except GraphoptError as exc:
        err_console.print(f"error: {exc}", soft_wrap=True, markup=False)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        err_console.print("interrupted", markup=False)
        raise typer.Exit(130) from None


def register(app: typer.Typer) -> None:
    @app.command("exec")
    def exec_(
        directory: Annotated[Path, typer.Argument(help="A partitioned model: a directory with manifest.json "
                                                       "and stage_0.onnx … (from the partition pass).",
                                                  show_default=False)],
        data: Annotated[Optional[str], typer.Option(
            "--data", help="Data: FILE.npz (keys = input names), a folder of .npz files, or module:function. "
                           "Without it, synthetic inputs are made from the manifest's input specs.")] = None,
        shape: Annotated[Optional[list[str]], typer.Option(
            "--shape", help="Pin an input's shape for synthetic data, e.g. input=1x3x224x224 (repeatable).")] = None,
        devices: Annotated[Optional[str], typer.Option(
            "--devices", help="Device per stage, e.g. cuda:0,cuda:1 or cuda:0,cpu (one entry: all stages). "
                              "[default: the manifest's]")] = None,
        backend: Annotated[str, typer.Option("--backend", help="threads (one thread per stage) or ray (one "
                                                              "Ray actor per stage).")] = "threads",
        micro_batch: Annotated[Optional[int], typer.Option(
            "--micro-batch", help="Rows per micro-batch, so stages work on different rows at once. "
                                  "[default: whole batches]", min=1)] = None,
        batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per batch read from the data.",
                                                min=1)] = 32,
        limit: Annotated[Optional[int], typer.Option("--limit", help="Most rows to run.", min=1)] = None,
        threads: Annotated[Optional[int], typer.Option(
            "--threads", help="ORT intra-op threads per stage. [default: the cores shared among CPU stages]",
            min=1)] = None,
        output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the outputs to this "
                                                                              ".npz (keys = output names).")] = None,
        reference: Annotated[Optional[Path], typer.Option(
            "--reference", help="The unpartitioned model: compare outputs with it (exit 1 beyond --tolerance).")] = None,
        tolerance: Annotated[float, typer.Option("--tolerance", help="With --reference: most max abs diff, "
                                                                     "relative to max(1, max |reference|).")] = 1e-5,
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    ) -> None:
        """Run a partitioned model's stages chained (threads or Ray) over data; print throughput and
        per-stage busy time.

        Examples:

          graphopt exec OUT_DIR --data calib.npz --micro-batch 8

          graphopt exec OUT_DIR --devices cuda:0,cpu --data test.npz -o outputs.npz --reference model.onnx

          graphopt exec OUT_DIR --backend ray --micro-batch 4
        """
        with _errors():
            from graphopt.data import SyntheticSource, open_data, parse_shape
            from graphopt.errors import GateFailed, UserError
            from graphopt.runtime import Runner, SessionFactory, SessionSettings
            from graphopt.stages import StagePipeline, read_manifest

            if backend not in ("threads", "ray"):
                raise UserError(f"--backend must be threads or ray; got {backend!r}")
            manifest = read_manifest(directory)
            specs = _specs(manifest)
            if data is None:
                highs = {e["name"]: e["int_high"] for e in manifest.get("model_inputs", []) if e.get("int_high")}
                source = SyntheticSource(specs, dict(parse_shape(x) for x in shape or []), rows=limit or 256, batch_size=batch_size,
                                         int_high=highs)
            else:
                source = open_data(data)
            factory = SessionFactory(SessionSettings(intra_op_threads=threads or 0))
            ref_runner = Runner(factory.session(reference)) if reference is not None else None
            collected: dict[str, list[np.ndarray]] = {}
            rows = 0
            max_diff = 0.0
            ref_max = 0.0
            batches = []  # kept only when comparing; streamed otherwise

            def feed() -> Any:
                for batch in source.batches(batch_size=batch_size, limit=limit, specs=specs):
                    if ref_runner is not None:
                        batches.append(batch.inputs)
                    yield batch.inputs

            with StagePipeline.from_dir(directory, devices=devices, backend=backend, micro_batch=micro_batch,
                                        session_factory=factory) as pipe:
                t0 = time.perf_counter()
                for outputs in pipe.stream(feed()):
                    n = len(outputs[0]) if outputs and np.ndim(outputs[0]) else 1
                    rows += n
                    if output is not None:
                        for name, arr in zip(pipe.output_names, outputs):
                            collected.setdefault(name, []).append(arr)
                    if ref_runner is not None:
                        inputs = batches.pop(0)
                        for r, c in zip(ref_runner.run(inputs), outputs):
                            r = np.asarray(r, dtype=np.float64)
                            max_diff = max(max_diff, float(np.max(np.abs(r - c))) if r.size else 0.0)
                            ref_max = max(ref_max, float(np.max(np.abs(r))) if r.size else 0.0)
                seconds = time.perf_counter() - t0
                stats = pipe.stage_stats()
            result: dict[str, Any] = {
                "directory": str(directory), "backend": backend, "devices": pipe.devices,
                "micro_batch": micro_batch, "batch_size": batch_size, "rows": rows, "seconds": seconds,
                "rows_per_s": rows / seconds if seconds > 0 else None,
                "stages": [{**s, "utilization": s["busy_s"] / seconds if seconds > 0 else None,
                            "predicted_share": manifest["stages"][s["stage"]].get("cost_share")} for s in stats],
                "balance_ratio_predicted": manifest.get("balance_ratio"),
            }
            if ref_runner is not None:
                limit_abs = tolerance * max(1.0, ref_max)
                result["reference"] = {"path": str(reference), "max_abs_diff": max_diff,
                                       "reference_max_abs": ref_max, "limit": limit_abs,
                                       "passed": max_diff <= limit_abs}
            if output is not None:
                _save_npz(output, {k: np.concatenate(v) if len(v) > 1 else v[0] for k, v in collected.items()})
                result["output"] = str(output)
            if as_json:
                console.print_json(json.dumps(result))
            else:
                _print(result)
            if ref_runner is not None and not result["reference"]["passed"]:
                raise GateFailed(f"stitched outputs differ from {reference}: max abs diff {max_diff:.3g} > "
                                 f"{result['reference']['limit']:.3g}")


def _print(result: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{result['directory']} ({result['backend']})", title_justify="left")
    for col in ("stage", "device", "micro-batches", "busy", "utilization", "predicted share"):
        table.add_column(col, justify="right")
    for s in result["stages"]:
        share = s.get("predicted_share")
        table.add_row(str(s["stage"]), s["device"], str(s["items"]), f"{s['busy_s']:.3f} s",
                      f"{100 * s['utilization']:.0f}%" if s["utilization"] is not None else "?",
                      f"{100 * share:.1f}%" if share is not None else "?")
    console.print(table)
    console.print(f"{result['rows']} rows in {result['seconds']:.3f} s = {result['rows_per_s'] or 0:.1f} rows/s")
    ref = result.get("reference")
    if ref:
        console.print(f"max abs diff vs {ref['path']}: {ref['max_abs_diff']:.3g} (limit {ref['limit']:.3g}) "
                      + ("ok" if ref["passed"] else "FAILED"))
    if result.get("output"):
        console.print(f"wrote {result['output']}")
