"""Every Python snippet of the README runs as pasted, on this offline machine.

Each ```python block is extracted, saved as a .py file and run with ``python snippet.py`` in a
fresh interpreter (from a temporary directory, with this checkout's package on ``PYTHONPATH``
and no network), twice: a reader runs a snippet again, so it must be re-runnable
(``exist_ok=True``). Nothing wraps a snippet: an async one brings its own ``asyncio.run``
(a top-level ``await`` is a SyntaxError in a file, and fails here). The only change made to a
snippet is its server: ``redis://localhost:6379/0`` becomes a private server started for this
module, ``redis://node-1:6379`` a private local cluster.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from convstate.embedded import LocalCluster
from tests.servers import RedisServer, default_engine

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text(encoding="utf-8")
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README, flags=re.S | re.M)
STANDALONE_URL = "redis://localhost:6379/0"
CLUSTER_URL = "redis://node-1:6379"
RUN_TIMEOUT = 120


def test_the_readme_has_the_snippets_this_test_knows() -> None:
    assert len(SNIPPETS) >= 4
    assert all(STANDALONE_URL in s or CLUSTER_URL in s for s in SNIPPETS), SNIPPETS


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer(default_engine()) as s:  # its own: the snippets use the default prefix
        yield s


def run_as_pasted(source: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``python snippet.py`` of ``source``, exactly as given (no wrapper)."""
    path = tmp_path / "snippet.py"
    path.write_text(source, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONVSTATE_", "OPENAI_"))}
    env["PYTHONPATH"] = str(REPO / "pyclient")
    return subprocess.run(
        [sys.executable, str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


def run_snippet(snippet: str, url_from: str, url_to: str, tmp_path: Path) -> None:
    assert url_from in snippet
    for attempt in (1, 2):  # re-runnable
        proc = run_as_pasted(snippet.replace(url_from, url_to), tmp_path)
        assert proc.returncode == 0, f"run {attempt} of\n{snippet}\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("snippet", SNIPPETS, ids=lambda s: s.splitlines()[0][:40])
def test_every_snippet_is_a_valid_python_file(snippet: str) -> None:
    """Without a server: each snippet compiles as a module (no top-level ``await``)."""
    compile(snippet, "README snippet", "exec")


def test_a_snippet_with_top_level_await_fails(tmp_path: Path) -> None:
    """The runner adds nothing: a top-level ``await``, a SyntaxError in a .py file, fails the
    test (it passed when the runner wrapped such snippets in ``asyncio.run``)."""
    proc = run_as_pasted("import asyncio\n\nawait asyncio.sleep(0)\n", tmp_path)
    assert proc.returncode != 0
    assert "SyntaxError" in proc.stderr
    assert (
        run_as_pasted("import asyncio\n\nasyncio.run(asyncio.sleep(0))\n", tmp_path).returncode == 0
    )


@pytest.mark.parametrize(
    "snippet",
    [s for s in SNIPPETS if STANDALONE_URL in s],
    ids=lambda s: s.splitlines()[0][:40],
)
def test_readme_snippet_runs_as_pasted(snippet: str, server: RedisServer, tmp_path: Path) -> None:
    run_snippet(snippet, STANDALONE_URL, server.url, tmp_path)


def test_the_quickstart_stored_what_it_says(server: RedisServer, tmp_path: Path) -> None:
    quickstart = next(s for s in SNIPPETS if "store.create_session" in s)
    run_snippet(quickstart, STANDALONE_URL, server.url, tmp_path)
    with redis.Redis.from_url(server.url) as r:
        keys = [k.decode() for k in r.scan_iter("cs:*chat-42:msgs")]
        assert len(keys) == 1, keys
        records = [json.loads(x) for x in r.lrange(keys[0], 0, -1)]
    assert records[0]["content"] == "You are a helpful assistant."
    assert any(m.get("content") == "Plan a trip to Kyoto." for m in records)


@pytest.mark.slow
@pytest.mark.cluster
def test_readme_cluster_snippet_runs_as_pasted(tmp_path: Path) -> None:
    snippets = [s for s in SNIPPETS if CLUSTER_URL in s]
    assert snippets
    with LocalCluster("redis", masters=3, replicas_per_master=0) as cluster:
        for snippet in snippets:
            run_snippet(snippet, CLUSTER_URL, cluster.url, tmp_path)


def test_every_error_a_call_can_raise_is_in_the_readme_table() -> None:
    """Each exception class of convstate.errors that the clients raise has a row (bases and
    the classes no client call raises are left out, each with its reason)."""
    import convstate.errors as errors

    not_raised_by_clients = {
        "ConvstateError": "the base class, named in the text",
        "ValidationError": "a base class",
        "SessionError": "a base class",
        "LeaseLostError": "the compaction daemon's own",
        "ServerVersionError": "declared, raised by nothing yet",
    }
    table = README[README.index("| error | when |") : README.index("## Compaction daemon")]
    classes = [
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, errors.ConvstateError)
    ]
    import convstate.adapters.langchain as langchain_adapter
    import convstate.adapters.openai_agents as agents_adapter

    adapters = [  # the adapters' own error classes
        name
        for module in (agents_adapter, langchain_adapter)
        for name, value in vars(module).items()
        if isinstance(value, type)
        and issubclass(value, errors.ConvstateError)
        and value.__module__ == module.__name__
    ]
    assert adapters
    missing = [
        n for n in classes + adapters if n not in not_raised_by_clients and f"`{n}`" not in table
    ]
    assert missing == []
    assert "`ConvstateError`" in README
