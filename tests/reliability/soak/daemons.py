"""The compaction daemons: ``convstate daemon`` subprocesses (:class:`DaemonHandle`) and
the command line and environment the soak starts them with."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from pathlib import Path

from tests.processes import clean_env
from tests.reliability.soak.config import SoakConfig

REPO = Path(__file__).resolve().parents[3]


class DaemonHandle:
    """A ``convstate daemon`` subprocess; stdout and stderr go to one log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log_path = log_dir / f"daemon-{name}.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )
        self.killed = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def kill9(self) -> int:
        self.killed = True
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(10)

    def terminate(self, timeout: float) -> int | None:
        """SIGTERM, wait; SIGKILL if it does not exit in time. Returns the SIGTERM exit code,
        or None if it had to be killed."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None

    def ensure_dead(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


def daemon_env() -> dict[str, str]:
    return clean_env(PYTHONUNBUFFERED="1")


def daemon_argv(config: SoakConfig, url: str, skew: float = 0.0) -> list[str]:
    """``python -m convstate.cli daemon`` with the soak's options (on a host whose wall clock
    is ``skew`` seconds off, through :mod:`tests.reliability.skewed`, if ``skew``)."""
    entry = ["tests.reliability.skewed", str(skew)] if skew else ["convstate.cli"]
    return [
        sys.executable,
        "-m",
        *entry,
        "daemon",
        "--redis-url",
        url,
        "--prefix",
        config.prefix,
        "--shards",
        str(config.shards),
        "--concurrency",
        str(config.concurrency),
        "--lease",
        str(config.lease),
        "--grace",
        str(config.grace),
        "--sweep-interval",
        str(config.sweep_interval),
        "--summarizer",
        "extractive",
        "--encoding",
        config.encoding,
        "--keep-recent-tokens",
        str(config.keep_recent_tokens),
        "--min-recent-messages",
        str(config.min_recent_messages),
        "--max-summary-tokens",
        str(config.max_summary_tokens),
        "--target-ratio",
        str(config.target_ratio),
        "--archive",
        "--http-port",
        "-1",
        "--log-level",
        "INFO",
    ]
