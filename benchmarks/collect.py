"""Assemble benchmarks/RESULTS.md from the per-benchmark sections in benchmarks/results/*.md.

Each benchmark script writes its own section (machine, versions, command, tables) when it runs; this keeps
RESULTS.md one page without benchmarks editing each other's text.
"""

from __future__ import annotations

from pathlib import Path

ORDER = ["quant", "prune", "distill", "partition", "partition_gpu", "lowrank", "fp16", "big_model", "tune"]


def main() -> None:
    here = Path(__file__).resolve().parent
    sections = {p.stem: p.read_text().strip() for p in sorted((here / "results").glob("*.md"))}
    names = [n for n in ORDER if n in sections] + sorted(set(sections) - set(ORDER))
    parts = ["# Benchmark results",
             "",
             "Each section was produced by the script it names, on the machine it names; rerun with "
             "`make bench` (or the script alone). Latencies are ONNX Runtime p50 measured interleaved with the "
             "model they are compared to, so ratios are the figures to read: the machine is shared and noisy.",
             ""]
    for n in names:
        parts += [sections[n], ""]
    (here / "RESULTS.md").write_text("\n".join(parts).rstrip() + "\n")
    print(f"wrote {here / 'RESULTS.md'} ({', '.join(names)})")


if __name__ == "__main__":
    main()
