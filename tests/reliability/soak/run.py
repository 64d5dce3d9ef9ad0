"""The run loop: :class:`_Soak` owns one run (server, writers, daemons, monitor, faults)
and always cleans up; :func:`run_soak` runs one soak and returns its :class:`SoakResult`."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import platform
import queue
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

import convstate
from convstate.embedded import RedisServer
from tests.reliability.soak.config import SoakConfig, SoakError, wall
from tests.reliability.soak.daemons import DaemonHandle, daemon_argv, daemon_env
from tests.reliability.soak.faults import _Faults
from tests.reliability.soak.invariants import MAX_SAMPLES, check_invariants
from tests.reliability.soak.ledger import Ledger, read_ledger
from tests.reliability.soak.monitor import _Condition, _Monitor, pubsub_ids
from tests.reliability.soak.result import FaultRecord, SoakResult
from tests.reliability.soak.writers import Writer, parse_message_id, writer_main


class _Soak:
    """One run: owns the server, the processes, the monitor; always cleans up."""

    def __init__(self, config: SoakConfig) -> None:
        self.config = config
        self.workdir = Path(config.workdir or tempfile.mkdtemp(prefix="convstate-soak-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        memory = (
            ["--maxmemory", config.maxmemory, "--maxmemory-policy", "noeviction"]
            if config.maxmemory
            else []
        )
        self.server = RedisServer(
            extra_args=["--appendonly", "yes", "--appendfsync", "always", *memory]
        )
        self.admin: redis.Redis
        self.monitor: _Monitor
        self.daemons: list[DaemonHandle] = []
        self.writers: list[Any] = []
        self.fault_conditions: list[list[_Condition]] = []
        self._daemon_seq = 0
        self._ctx = multiprocessing.get_context("spawn")

    # -- processes ---------------------------------------------------------------------------

    def daemons_alive(self) -> list[DaemonHandle]:
        return [d for d in self.daemons if not d.killed and d.proc.poll() is None]

    def start_daemon(self) -> DaemonHandle:
        self._daemon_seq += 1
        handle = DaemonHandle(
            f"d{self._daemon_seq}",
            daemon_argv(self.config, self.server.url, self.config.skew_of(self._daemon_seq)),
            daemon_env(),
            self.workdir,
        )
        self.daemons.append(handle)
        return handle

    def _wait(self, what: str, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():
            for d in self.daemons:
                if not d.killed and d.proc.poll() is not None:
                    raise SoakError(f"daemon {d.name} exited ({d.proc.returncode}):\n{d.tail()}")
            if time.monotonic() > deadline:
                tails = "\n".join(f"--- {d.name}:\n{d.tail(10)}" for d in self.daemons)
                raise SoakError(f"timed out after {timeout}s waiting for {what}\n{tails}")
            time.sleep(0.1)

    def _log(self, index: int) -> Path:
        """Ledger file of writer ``index`` (-1: the seeder, which is writer ``writers``)."""
        return self.workdir / f"writer-{index % (self.config.writers + 1):02d}.jsonl"

    def _writer_logs(self) -> list[Path]:
        """Every ledger: the writers' and the seeder's (those that exist)."""
        paths = [self._log(i) for i in range(self.config.writers + 1)]
        return [path for path in paths if path.exists()]

    # -- phases ------------------------------------------------------------------------------

    def setup(self) -> None:
        config = self.config
        self.server.start()
        self.admin = redis.Redis.from_url(
            self.server.url,
            socket_timeout=5,
            socket_connect_timeout=2,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 20),
        )
        settings = self.admin.config_get("append*")
        if settings.get("appendonly") != "yes" or settings.get("appendfsync") != "always":
            raise SoakError(f"the server does not keep an fsynced AOF: {settings}")
        config.create_sessions(self.server.url)
        if config.prefill:
            # An extra writer (index ``writers``) fills every session to 40-90% of its limit.
            seeder = Writer(config.writer_spec(config.writers, self.server.url, self._log(-1)))
            try:
                for sid in config.session_ids():
                    seeder.prefill(sid, int(config.token_limit * seeder.rng.uniform(0.4, 0.9)))
            finally:
                seeder.close()
        self.monitor = _Monitor(self.server.url, config)
        channel = config.schema().wake_channel
        for _ in range(config.daemons):
            self.start_daemon()
        ready: Any = self._ctx.Queue()
        self.go = self._ctx.Event()
        self.stop = self._ctx.Event()
        for i in range(config.writers):
            spec = config.writer_spec(i, self.server.url, self._log(i))
            proc = self._ctx.Process(
                target=writer_main,
                args=(spec, ready, self.go, self.stop),
                name=f"soak-writer-{i}",
                daemon=True,
            )
            proc.start()
            self.writers.append(proc)
        deadline = time.monotonic() + config.startup_timeout
        started = 0
        while started < config.writers:
            try:
                ready.get(timeout=0.5)
                started += 1
            except queue.Empty:
                dead = [p.name for p in self.writers if p.exitcode is not None]
                if dead or time.monotonic() > deadline:
                    raise SoakError(
                        f"writers did not start ({started} ready, exited: {dead})"
                    ) from None
        self._wait(
            f"{config.daemons} daemons to subscribe",
            lambda: len(pubsub_ids(self.admin, channel)) >= config.daemons,
            config.startup_timeout,
        )

    def run(self) -> SoakResult:
        config = self.config
        self.setup()
        faults = _Faults(self)
        records: list[FaultRecord] = []
        self.monitor.start()
        self.started_at = time.time()
        self.go.set()
        for kind, fraction in config.schedule:
            at = self.started_at + fraction * config.duration
            time.sleep(max(0.0, at - time.time()))
            records.append(faults.inject(kind, fraction * config.duration))
        time.sleep(max(0.0, self.started_at + config.duration - time.time()))
        self.stop.set()
        writes_stopped_at = time.time()
        exit_codes: list[int | None] = []
        for proc in self.writers:
            proc.join(config.give_up_after + 30)
            if proc.exitcode is None:
                proc.kill()
                proc.join(5)
            exit_codes.append(proc.exitcode)
        drained, drain_s = self.drain()
        drained_at_ms = int(time.time() * 1000)
        self.monitor.stop()
        daemon_exits: dict[str, int | None] = {}
        for d in self.daemons:
            daemon_exits[d.name] = -signal.SIGKILL if d.killed else d.terminate(config.grace + 10)
        ledger = read_ledger(self._writer_logs())
        report = check_invariants(self.admin, config, ledger, drained_at_ms=drained_at_ms)
        live = self.monitor.violations
        for kind, n in live.counts.items():
            report.counts[kind] += n
            report.samples[kind].extend(live.samples[kind][:MAX_SAMPLES])
        report.live_snapshots = self.monitor.samples
        self._measure_recovery(records, ledger, writes_stopped_at)
        first_fault = records[0].started_at if records else writes_stopped_at
        return SoakResult(
            config=config,
            started_at=self.started_at,
            writes_stopped_at=writes_stopped_at,
            finished_at=wall(),
            engine=self.engine(),
            redis_py=redis.__version__,
            python=platform.python_version(),
            convstate=convstate.__version__,
            invariants=report,
            faults=records,
            ledger_stats=dict(ledger.stats),
            messages_acked=len(ledger.acked_ids),
            prefilled_messages=sum(
                1
                for mid in ledger.acked_ids
                if (parse_message_id(mid) or (-1, 0))[0] == config.writers
            ),
            calls_acked=ledger.acked_calls,
            compactions=report.compactions,
            compactions_before_first_fault=len(
                self.monitor.compactions_between(self.started_at, first_fault)
            ),
            drained=drained,
            drain_s=drain_s,
            writer_exit_codes=exit_codes,
            daemon_exits=daemon_exits,
            unexpected_errors=ledger.unexpected_errors,
            crashes=ledger.crashes,
            gave_up=len(ledger.gave_up),
            max_queued=self.monitor.max_queued,
            max_running=self.monitor.max_running,
            max_expired_lease_s=max(0, self.monitor.max_expired_lease_ms) / 1000,
            monitor_errors=dict(self.monitor.errors),
            workdir=str(self.workdir),
        )

    def drain(self) -> tuple[bool, float]:
        """Wait (bounded) until no session is queued or running."""
        schema, started = self.config.schema(), time.monotonic()

        def empty() -> bool:
            pipe = self.admin.pipeline(transaction=False)
            for shard in range(self.config.shards):
                pipe.zcard(schema.queue(shard))
                pipe.zcard(schema.running(shard))
            return not any(pipe.execute())

        try:
            self._wait("the daemons to drain the queues", empty, self.config.drain_timeout)
        except SoakError:
            return False, time.monotonic() - started
        return True, time.monotonic() - started

    def engine(self) -> str:
        info = self.admin.info("server")
        if info.get("valkey_version"):
            return f"valkey {info['valkey_version']}"
        return f"redis {info.get('redis_version')}"

    def _measure_recovery(
        self, records: list[FaultRecord], ledger: Ledger, writes_stopped_at: float
    ) -> None:
        for i, record in enumerate(records):
            end = records[i + 1].started_at if i + 1 < len(records) else writes_stopped_at
            record.window_end = end
            t0, t1 = record.started_at, record.injected_at
            firsts = []
            for w in range(self.config.writers):
                after = [t for t in ledger.ack_times.get(w, []) if t >= t1]
                firsts.append(min(after) if after else None)
            if all(t is not None for t in firsts):
                record.writer_recovery_s = max(t for t in firsts if t is not None) - t0
            compactions = self.monitor.compactions_between(t1, end)
            record.compactions_in_window = len(compactions)
            later = self.monitor.compactions_between(t1, float("inf"))
            if later:
                record.compaction_recovery_s = later[0] - t0
            for condition in self.fault_conditions[i]:
                at = condition.satisfied_at
                record.conditions[condition.name] = None if at is None else round(at - t0, 3)
            record.writer_errors_in_window = sum(
                1 for t, _, _ in ledger.transient_errors if t0 <= t < end
            )
            parts = [record.writer_recovery_s, record.compaction_recovery_s]
            parts += list(record.conditions.values())
            if all(p is not None for p in parts):
                record.recovery_s = max(p for p in parts if p is not None)
                record.recovered = True
                # ... before the next fault (or, for the last one, before the writes stopped)?
                record.within_window = t0 + record.recovery_s <= end

    def cleanup(self, keep: bool) -> None:
        with contextlib.suppress(Exception):
            self.stop.set()
        for proc in self.writers:
            if proc.is_alive():
                proc.kill()
            proc.join(5)
            with contextlib.suppress(Exception):
                proc.close()
        for d in self.daemons:
            d.ensure_dead()
        with contextlib.suppress(Exception):
            self.monitor.stop()
        with contextlib.suppress(Exception):
            self.admin.close()
        self.server.stop()
        if not keep:
            shutil.rmtree(self.workdir, ignore_errors=True)


def run_soak(config: SoakConfig | None = None) -> SoakResult:
    """Run one soak (see the module docstring); always stops every process it started.

    The workdir (writer ledgers, daemon logs, ``result.json``) is removed afterwards unless
    ``config.keep_workdir`` is set or the run found a problem.
    """
    config = config or SoakConfig()
    soak = _Soak(config)
    keep = True
    try:
        result = soak.run()
        (soak.workdir / "result.json").write_text(
            json.dumps(result.as_dict(), indent=2, default=str)
        )
        keep = config.keep_workdir or not result.ok
        return result
    finally:
        soak.cleanup(keep)
