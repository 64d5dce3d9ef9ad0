"""The result model: :class:`FaultRecord` (one injected fault and its recovery) and
:class:`SoakResult` (everything a run measured, and the problems it found)."""

from __future__ import annotations

import signal
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from tests.reliability.soak.config import SoakConfig
from tests.reliability.soak.invariants import InvariantReport


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


@dataclass
class FaultRecord:
    """One injected fault and how the system recovered from it.

    ``started_at``/``injected_at``: wall-clock times the injection began and completed
    (server back up, pause over, ...). Recovery is measured from ``started_at`` to the moment
    every condition held: every writer had an acknowledged append after ``injected_at``
    (``writer_recovery_s``), a compaction completed after ``injected_at``
    (``compaction_recovery_s``), and the fault's own conditions (``conditions``: name ->
    seconds after ``started_at``, or None if never met). ``recovered``: all of them held
    before the run ended (the monitor stops after the drain); ``within_window``: before the
    next fault began (the last one: before the writers stopped).
    """

    kind: str
    offset_s: float
    started_at: float
    injected_at: float
    details: dict[str, Any] = field(default_factory=dict)
    conditions: dict[str, float | None] = field(default_factory=dict)
    window_end: float = 0.0
    writer_recovery_s: float | None = None
    compaction_recovery_s: float | None = None
    recovery_s: float | None = None
    recovered: bool = False
    within_window: bool = False
    compactions_in_window: int = 0
    writer_errors_in_window: int = 0

    @property
    def injection_s(self) -> float:
        return self.injected_at - self.started_at


@dataclass
class SoakResult:
    """Everything a run measured; :meth:`problems` lists what broke the promise.

    ``messages_acked`` counts every acknowledged message, the ``prefilled_messages`` that the
    seeder appended before the soak included."""

    config: SoakConfig
    started_at: float
    writes_stopped_at: float
    finished_at: float
    engine: str
    redis_py: str
    python: str
    convstate: str
    invariants: InvariantReport
    faults: list[FaultRecord]
    ledger_stats: dict[str, int]
    messages_acked: int
    prefilled_messages: int
    calls_acked: int
    compactions: int
    compactions_before_first_fault: int
    drained: bool
    drain_s: float
    writer_exit_codes: list[int | None]
    daemon_exits: dict[str, int | None]
    unexpected_errors: list[str]
    crashes: list[str]
    gave_up: int
    max_queued: int
    max_running: int
    max_expired_lease_s: float
    monitor_errors: dict[str, int]
    workdir: str

    @property
    def duration_s(self) -> float:
        return self.writes_stopped_at - self.started_at

    @property
    def worst_recovery_s(self) -> float | None:
        values = [f.recovery_s for f in self.faults if f.recovery_s is not None]
        return max(values) if values else None

    def problems(self) -> list[str]:
        found = list(self.invariants.describe())
        for fault in self.faults:
            if not fault.recovered:
                found.append(
                    f"fault {fault.kind} at {fault.offset_s:.1f}s did not recover: "
                    f"writers {_round(fault.writer_recovery_s)} s, compaction "
                    f"{_round(fault.compaction_recovery_s)} s, conditions {fault.conditions}"
                )
            if fault.compactions_in_window < 1:
                found.append(f"no compaction observed in the window after {fault.kind}")
        if self.unexpected_errors:
            found.append(
                f"{len(self.unexpected_errors)} errors reached callers: "
                f"{self.unexpected_errors[:3]}"
            )
        if self.gave_up:
            found.append(f"writers gave up on {self.gave_up} messages")
        if self.crashes:
            found.append(f"writer crashes: {self.crashes[:2]}")
        if any(code != 0 for code in self.writer_exit_codes):
            found.append(f"writer exit codes {self.writer_exit_codes}")
        bad_exits = {
            name: code
            for name, code in self.daemon_exits.items()
            if code != 0 and code != -signal.SIGKILL
        }
        if bad_exits:
            found.append(f"daemons did not stop cleanly on SIGTERM: {bad_exits}")
        if not self.drained:
            found.append(f"the queues were not drained within {self.config.drain_timeout}s")
        if self.compactions < 1:
            found.append("no compaction at all")
        return found

    @property
    def ok(self) -> bool:
        return not self.problems()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: every field, plus the worst recovery and the problems found."""
        data: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, InvariantReport):
                data[f.name] = value.as_dict()
            elif f.name == "faults":
                data[f.name] = [asdict(fault) for fault in value]
            elif f.name == "config":
                data[f.name] = {k: v for k, v in asdict(value).items() if k != "workdir"}
            else:
                data[f.name] = value
        data["worst_recovery_s"] = self.worst_recovery_s
        data["problems"] = self.problems()
        return data
