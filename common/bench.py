"""`djs bench NAME [args...]`: run `benchmarks/NAME.py` of the repository this package is
installed from (an editable install: `pip install -e '.[bench]'`), through its `main()`."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
NOT_BENCHMARKS = frozenset({"harness", "peer_jobs"})


def available() -> list[str]:
    if not BENCH_DIR.is_dir():
        return []
    return sorted(p.stem for p in BENCH_DIR.glob("*.py")
                  if not p.stem.startswith("_") and p.stem not in NOT_BENCHMARKS)


def run_benchmark(name: str, argv: list[str]) -> int:
    names = available()
    if name not in names:
        listed = ", ".join(names) if names else f"none (no {BENCH_DIR})"
        print(f"unknown benchmark {name!r}; available: {listed}", file=sys.stderr)
        return 2
    path = BENCH_DIR / f"{name}.py"
    sys.path.insert(0, str(BENCH_DIR))  # the benchmarks import their harness
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    code = module.main(argv)
    return int(code or 0)
