"""How the sparse benchmarks (bench_vector_engine, csr_search_bench, ssr_scale, ssr_scifact) record a run: the
result as indented JSON and its figure beside it, same name with .png. Scripts import it as a sibling
(`sys.path` holds evals/ when a script runs), since evals/ is scripts, not a package."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def save_results(result: dict, json_path: Path, plot: Callable[[dict, Path], None]) -> None:
    """Write `result` to json_path (folders made as needed), then `plot(result, json_path with .png)`."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, json_path.with_suffix(".png"))


@contextmanager
def figure(path: Path, *grid, **options) -> Iterator[tuple]:
    """`plt.subplots(*grid, **options)` on the headless Agg backend, laid out tight and saved to `path` at
    120 dpi when the block ends (the figure is then closed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(*grid, **options)
    try:
        yield fig, axes
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)


def cpu_name() -> str:
    """The CPU as speed records name it: model and widest vector ISA (e.g. "AMD EPYC (avx2)"). Ratios between
    SeqTopK and stock move with the ISA (vLLM's CPU MoE kernel is several times faster with AVX-512), so records
    from different machines are only compared with this beside them."""
    import platform

    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and not model:
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    isa = next((name for name in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if name in flags), "")
    name = model or platform.processor() or platform.machine()
    return f"{name} ({isa})" if isa else name
