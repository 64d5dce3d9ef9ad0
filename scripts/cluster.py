#!/usr/bin/env python3
"""Run a private, throw-away Redis Cluster on loopback ports until Ctrl-C or SIGTERM.

The cluster is a :class:`convstate.embedded.LocalCluster`: ``masters * (1 + replicas)``
cluster-enabled servers of one engine on free loopback ports (never 6379), each in its own
temporary directory, formed with plain commands (no ``redis-cli`` needed). Stopping the
script stops every node and removes the directories.

    scripts/cluster.py start                          # redis, 3 masters, 1 replica each
    scripts/cluster.py start --engine valkey --masters 3 --replicas 0
    scripts/cluster.py start --json                   # one JSON line: url, engine, nodes

Text output: the URL (``redis://127.0.0.1:<port of the first master>``) on the first line,
then one line per node. ``--json`` prints a single line instead::

    {"url": "redis://127.0.0.1:PORT", "engine": "redis", "version": "7.0.15",
     "startup_nodes": [["127.0.0.1", PORT], ...],
     "nodes": [{"id": ..., "host": ..., "port": ..., "role": "master" | "replica",
                "master": PORT | null, "slots": [[first, last], ...], "pid": ...,
                "dir": ..., "log": ...}, ...]}

Exit status: 0 after a clean stop, 1 if the cluster could not be started or every node died.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from pathlib import Path
from types import FrameType

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "pyclient"))  # this checkout's convstate

from convstate.embedded import (  # noqa: E402
    ENGINES,
    ClusterError,
    EngineNotFoundError,
    LocalCluster,
)


class _Stop(Exception):
    """SIGTERM/SIGHUP arrived."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cluster.py", description="Run a private local Redis Cluster until Ctrl-C."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start a cluster and keep it running")
    start.add_argument("--engine", choices=ENGINES, default="redis", help="default: redis")
    start.add_argument("--masters", type=int, default=3, help="default: 3")
    start.add_argument("--replicas", type=int, default=1, help="replicas per master (default: 1)")
    start.add_argument(
        "--json", action="store_true", help="print the URL and node list as one JSON line"
    )
    start.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for each formation step (default: 30)",
    )
    return parser


def _print_text(cluster: LocalCluster, nodes: list[dict[str, object]]) -> None:
    print(cluster.url)
    for node in nodes:
        slots = node["slots"]
        assert isinstance(slots, list)
        ranges = " ".join(f"{a}-{b}" if a != b else str(a) for a, b in slots)
        role = node["role"]
        detail = f"slots {ranges}" if role == "master" else f"replica of {node['master']}"
        print(f"  {node['host']}:{node['port']}  {role:<7}  {detail}  (pid {node['pid']})")
    print("Ctrl-C (or SIGTERM) stops the cluster.", flush=True)


def _run(args: argparse.Namespace) -> int:
    if args.masters < 1 or args.replicas < 0:
        print("error: --masters must be >= 1 and --replicas >= 0", file=sys.stderr)
        return 2
    try:
        cluster = LocalCluster(
            args.engine,
            masters=args.masters,
            replicas_per_master=args.replicas,
            timeout=args.timeout,
        )
    except EngineNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        cluster.start()
        nodes = cluster.describe()
        if args.json:
            version = ".".join(str(part) for part in cluster.nodes[0].version)
            document = {
                "url": cluster.url,
                "engine": cluster.engine,
                "version": version,
                "startup_nodes": cluster.startup_nodes,
                "nodes": nodes,
            }
            print(json.dumps(document), flush=True)
        else:
            _print_text(cluster, nodes)
        while any(node.running for node in cluster.nodes):
            time.sleep(0.5)
        print("error: every cluster node has exited", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Stop):
        return 0
    except (ClusterError, EngineNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        # Another signal while stopping must not leave nodes behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.stop()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Explicitly: a background job started by a non-interactive shell ignores SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGHUP, _raise_stop)
    return _run(args)


if __name__ == "__main__":
    sys.exit(main())
