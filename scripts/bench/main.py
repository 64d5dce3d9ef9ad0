"""The command line: which sections to run, the settings of a full or ``--quick`` run, and the
run itself (:class:`Bench`, :class:`Report` put together from the measurements)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import REPO_ROOT
from bench import __doc__ as PACKAGE_DOC
from bench.append import AppendMeasure, AppendReport
from bench.compaction import CompactionMeasure, CompactionReport
from bench.core import BenchBase, Settings
from bench.cost import CostMeasure, CostReport
from bench.counting import CountingMeasure, CountingReport
from bench.environment import environment
from bench.memory import MemoryMeasure, MemoryReport
from bench.peers import ChatMemoryBuffer, RedisSession
from bench.reads import ReadsMeasure, ReadsReport
from bench.report import ReportBase
from bench.turn import TurnMeasure, TurnReport
from convstate.embedded import ENGINES, RedisServer, default_engine

SECTIONS = {
    "append": "1",
    "turn": "2",
    "reads": "3",
    "cost": "4",
    "memory": "5",
    "compaction": "6",
    "counting": "7",
}


class Bench(
    BenchBase,
    AppendMeasure,
    TurnMeasure,
    ReadsMeasure,
    CostMeasure,
    MemoryMeasure,
    CompactionMeasure,
    CountingMeasure,
):
    """Every measurement; :func:`main` calls the method named after each wanted section."""


class Report(
    ReportBase,
    AppendReport,
    TurnReport,
    ReadsReport,
    CostReport,
    MemoryReport,
    CompactionReport,
    CountingReport,
):
    """Every section of the report."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python scripts/bench",
        description=PACKAGE_DOC.split("\n\n")[0] if PACKAGE_DOC else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a short run (under 2 minutes)")
    parser.add_argument("--runs", type=int, default=None, help="runs (default 5; quick 3)")
    parser.add_argument(
        "--out", type=Path, default=REPO_ROOT / "docs" / "benchmarks.md", help="the report"
    )
    parser.add_argument(
        "--cell-cap",
        type=float,
        default=None,
        help="seconds one per-turn cell of [2] may take over all runs (default 20; quick 8)",
    )
    parser.add_argument(
        "--only",
        default=None,
        help="comma-separated sections to run (1-7 or names: " + ", ".join(SECTIONS) + ")",
    )
    parser.add_argument("--engine", choices=ENGINES, default=None, help="server engine")
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be >= 1")
    return args


def make_settings(args: argparse.Namespace) -> Settings:
    if args.quick:
        s = Settings(
            quick=True,
            runs=3,
            seq_ops=300,
            bursts=3,
            turn_ops=60,
            cell_cap_s=8.0,
            read_ops=60,
            cost_ops=300,
            compaction_runs=1,
            sessions_per_worker=4,
            model_delay_s=0.005,
            count_ops=2_000,
            llama_child=False,
        )
    else:
        s = Settings(
            quick=False,
            runs=5,
            seq_ops=1_000,
            bursts=8,
            turn_ops=300,
            cell_cap_s=20.0,
            read_ops=200,
            cost_ops=2_000,
            compaction_runs=3,
            sessions_per_worker=8,
            model_delay_s=0.02,
            count_ops=20_000,
        )
    if args.runs is not None:
        s.runs = args.runs
        s.compaction_runs = min(s.compaction_runs, args.runs)
    if args.cell_cap is not None:
        s.cell_cap_s = args.cell_cap
    return s


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = make_settings(args)
    wanted = set(SECTIONS)
    if args.only:
        keys = {v: k for k, v in SECTIONS.items()}
        wanted = {keys.get(item.strip(), item.strip()) for item in args.only.split(",")}
        unknown = wanted - set(SECTIONS)
        if unknown:
            print(f"unknown sections: {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
    missing = [
        name
        for name, present in (
            ("openai-agents", RedisSession is not None),
            ("llama-index-core + llama-index-storage-chat-store-redis", ChatMemoryBuffer),
        )
        if not present
    ]
    if missing:
        print(f"peers not installed (pip install -e '.[bench]'): {', '.join(missing)}")
    command = "python scripts/bench" + " ".join(
        [""] + [a for a in (argv if argv is not None else sys.argv[1:])]
    )
    started = time.perf_counter()
    with RedisServer(args.engine or default_engine()) as server:
        env = environment(server)
        print(
            f"convstate benchmarks: {env['server']} on private port {server.port}; "
            f"{env['cpu']}, {env['cores']} cores; runs {settings.runs}"
            f"{' (quick)' if settings.quick else ''}",
            flush=True,
        )
        bench = Bench(server, settings)
        try:
            for name in SECTIONS:
                if name not in wanted:
                    continue
                t0 = time.perf_counter()
                print(f"[{SECTIONS[name]}] {name} ...", flush=True)
                getattr(bench, name)()
                print(f"[{SECTIONS[name]}] {name}: {time.perf_counter() - t0:.1f} s", flush=True)
        finally:
            bench.close()
    elapsed = time.perf_counter() - started
    env["load_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    Report(bench, env, args.out.resolve(), command, elapsed).write()
    print(f"wrote {args.out} and its plots in {elapsed:.0f} s")
    return 0
