"""`djs bench NAME`: runs benchmarks/NAME.py for real (its own cluster of real processes)
and lists the benchmarks when NAME is unknown. Figures are printed, never asserted on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.e2e

DJS = [sys.executable, "-c", "from common.cli import app; app()"]
ROOT = Path(__file__).resolve().parents[2]


def test_unknown_benchmark_lists_the_available_ones() -> None:
    out = subprocess.run([*DJS, "bench", "nope"], capture_output=True, text=True, cwd=ROOT,
                         timeout=30)
    assert out.returncode == 2
    assert "unknown benchmark 'nope'" in out.stderr
    for name in ("throughput", "drain", "latency", "scale", "node_scale", "peers",
                 "fairness"):
        assert name in out.stderr
    assert "harness" not in out.stderr


def test_bench_latency_prints_figures_and_json() -> None:
    out = subprocess.run([*DJS, "bench", "latency", "--count", "5", "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=50)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    figures = dict(line.split(" ", 1)[0].split("=") for line in lines
                   if "=" in line and not line.startswith(("#", "{")))
    assert set(figures) == {"djs_latency_p50_ms", "djs_latency_p99_ms", "djs_latency_max_ms"}
    summary = json.loads(lines[-1])
    assert summary["benchmark"] == "latency"
    for name, value in figures.items():
        assert summary["figures"][name]["unit"] == "ms"
        assert summary["figures"][name]["value"] > 0
        assert float(value) > 0


def test_bench_scale_runs_its_simulated_nodes_through_the_real_handshake() -> None:
    """Its nodes speak the protocol by hand: a change to the handshake must not leave the
    benchmark behind (it did once, unnoticed, when the proxy began with CHALLENGE)."""
    figures = bench_figures("scale", "--jobs", "2000", "--nodes", "3")
    for name in ("scale_proxy_rss_mb", "scale_restart_s", "scale_core_round_ms",
                 "scale_refill_all_nodes_ms"):
        assert figures[name]["value"] > 0


def test_bench_fairness_measures_a_client_beside_a_flood() -> None:
    figures = bench_figures("fairness", "--seconds", "0.5")
    for name in ("alone_wait_p50_ms", "beside_flood_wait_p50_ms", "beside_flood_tickets",
                 "flood_tickets_per_s"):
        assert figures[name]["value"] > 0


def test_bench_node_scale_fills_a_node_and_restarts_it() -> None:
    figures = bench_figures("node_scale", "--tickets", "2000")
    for name in ("node_scale_rss_mb", "node_scale_store_mb", "node_scale_restart_s",
                 "node_scale_rss_after_restart_mb"):
        assert figures[name]["value"] > 0


def bench_figures(name: str, *args: str) -> dict[str, dict[str, Any]]:
    """Run `djs bench NAME ARGS --json`; the figures of its JSON summary."""
    out = subprocess.run([*DJS, "bench", name, *args, "--json"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    figures: dict[str, dict[str, Any]] = json.loads(out.stdout.splitlines()[-1])[
        "figures"]
    return figures
