"""The local Redis Cluster launcher: ``convstate.embedded.LocalCluster`` and ``scripts/cluster.py``.

One 3-master/3-replica cluster on the ``redis`` engine is shared by the module; the Valkey
and Redis 6.2 engines each get a 3-master/0-replica cluster of their own. Every node binds a
free loopback port (never 6379) and lives in its own temporary directory.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from convstate.embedded import (
    CLUSTER_SLOTS,
    DEFAULT_REDIS_PORT,
    LocalCluster,
    RedisServer,
    parse_cluster_nodes,
)

pytestmark = pytest.mark.cluster

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "scripts" / "cluster.py"


def _cluster_client(cluster: LocalCluster) -> RedisCluster:
    return RedisCluster(
        startup_nodes=[
            ClusterNode(host, port)  # type: ignore[no-untyped-call]
            for host, port in cluster.startup_nodes
        ],
        decode_responses=True,
    )


def _slot(key: str) -> int:
    return key_slot(key.encode())


def _keys_in_slot(slot: int, node: RedisServer) -> int:
    with node.client() as direct:
        return int(direct.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot))


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster("redis", masters=3, replicas_per_master=1) as local:
        yield local


@pytest.fixture
def rc(cluster: LocalCluster) -> Iterator[RedisCluster]:
    client = _cluster_client(cluster)
    try:
        yield client
    finally:
        client.close()


def test_layout_and_properties(cluster: LocalCluster) -> None:
    assert len(cluster.nodes) == 6
    assert len(cluster.masters) == 3
    assert len(cluster.replicas) == 3
    ports = [node.port for node in cluster.nodes]
    assert len(set(ports)) == 6
    assert DEFAULT_REDIS_PORT not in ports
    assert cluster.startup_nodes == [("127.0.0.1", port) for port in ports]
    assert cluster.url == f"redis://127.0.0.1:{cluster.masters[0].port}"
    dirs = {node.dir for node in cluster.nodes}
    assert len(dirs) == 6
    assert all((directory / "nodes.conf").is_file() for directory in dirs)
    # The 16384 slots are split evenly over the masters.
    owners = [cluster.master_of_slot(slot).port for slot in (0, 5460, 5461, 10921, 10922, 16383)]
    first, second, third = (node.port for node in cluster.masters)
    assert owners == [first, first, second, second, third, third]
    for replica in cluster.replicas:
        assert cluster.master_of(replica) in cluster.masters
    assert {cluster.master_of(replica).port for replica in cluster.replicas} == {
        first,
        second,
        third,
    }
    with cluster.nodes[0].client() as direct:
        assert (
            cluster.node_id(cluster.nodes[0]) == direct.execute_command("CLUSTER", "MYID").decode()
        )
        assert direct.config_get("appendonly")["appendonly"] == "no"
        assert direct.config_get("save")["save"] == ""
        assert direct.config_get("cluster-node-timeout")["cluster-node-timeout"] == "2000"


def test_sets_and_gets_keys_across_slots(cluster: LocalCluster, rc: RedisCluster) -> None:
    keys = [f"spread:{i}" for i in range(300)]
    for key in keys:
        rc.set(key, f"value-{key}", ex=300)
    assert all(rc.get(key) == f"value-{key}" for key in keys)
    slots = {_slot(key) for key in keys}
    assert len({cluster.master_of_slot(slot).port for slot in slots}) == 3
    for master in cluster.masters:
        with master.client() as direct:
            assert direct.dbsize() > 0
    rc.delete(*keys[:10])  # a multi-slot DEL is split over the nodes by the client
    assert rc.get(keys[0]) is None


def test_cluster_nodes_shows_masters_and_replicas_connected(
    cluster: LocalCluster, rc: RedisCluster
) -> None:
    nodes = rc.cluster_nodes()
    assert len(nodes) == 6
    masters = {addr: n for addr, n in nodes.items() if "master" in str(n["flags"])}
    replicas = {addr: n for addr, n in nodes.items() if "slave" in str(n["flags"])}
    assert len(masters) == 3
    assert len(replicas) == 3
    assert all(n["connected"] for n in nodes.values())
    assert not any("fail" in str(n["flags"]) for n in nodes.values())
    master_ids = {n["node_id"] for n in masters.values()}
    assert {n["master_id"] for n in replicas.values()} == master_ids
    # Every node, asked directly, agrees and reports cluster_state:ok.
    for node in cluster.nodes:
        with node.client() as direct:
            entries = parse_cluster_nodes(direct.execute_command("CLUSTER", "NODES").decode())
            info = direct.execute_command("CLUSTER", "INFO").decode()
        assert "cluster_state:ok" in info
        assert sorted(e.port for e in entries if e.is_master) == sorted(
            n.port for n in cluster.masters
        )
        assert all(e.healthy for e in entries)
        assert sum(last - first + 1 for e in entries for first, last in e.slots) == CLUSTER_SLOTS
    for replica in cluster.replicas:
        with replica.client() as direct:
            replication = direct.info("replication")
        assert replication["role"] == "slave"
        assert replication["master_link_status"] == "up"
        assert replication["master_port"] == cluster.master_of(replica).port


def test_migrate_slot_under_concurrent_writes(cluster: LocalCluster, rc: RedisCluster) -> None:
    tag = "migrating"
    slot = _slot(f"{{{tag}}}")
    source = cluster.master_of_slot(slot)
    target = next(node for node in cluster.masters if node.port != source.port)
    before = {f"{{{tag}}}:pre:{i}": f"v{i}" for i in range(500)}
    rc.mset_nonatomic(before)

    written: dict[str, str] = {}
    errors: list[BaseException] = []
    stop = threading.Event()
    migrating = threading.Event()
    writes_during_migration = 0

    def writer() -> None:
        nonlocal writes_during_migration
        client = _cluster_client(cluster)
        try:
            i = 0
            while not stop.is_set():
                key, value = f"{{{tag}}}:w:{i}", f"w{i}"
                client.set(key, value)
                written[key] = value
                if migrating.is_set():
                    writes_during_migration += 1
                # Overwrite an old key too: the write lands wherever the key lives now.
                client.set(f"{{{tag}}}:pre:{i % 500}", f"v{i % 500}")
                i += 1
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while len(written) < 50 and time.monotonic() < deadline and not errors:
            time.sleep(0.01)
        migrating.set()
        moved = cluster.migrate_slot(slot, source, target, batch=10)
        migrating.clear()
        settle = len(written)
        while len(written) < settle + 50 and time.monotonic() < deadline and not errors:
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not errors, errors
    assert not thread.is_alive()
    assert writes_during_migration > 0
    assert moved >= len(before)

    assert cluster.master_of_slot(slot).port == target.port
    assert _keys_in_slot(slot, source) == 0
    assert _keys_in_slot(slot, target) == len(before) + len(written)
    expected = {**before, **written}
    assert rc.mget_nonatomic(list(expected)) == list(expected.values())
    # A fresh client learns the new owner from the cluster itself.
    fresh = _cluster_client(cluster)
    try:
        owner = fresh.get_node_from_key(f"{{{tag}}}")  # type: ignore[no-untyped-call]
        assert owner.port == target.port
        assert fresh.get(f"{{{tag}}}:pre:0") == "v0"
    finally:
        fresh.close()


def test_failover_promotes_a_replica(cluster: LocalCluster) -> None:
    replica = cluster.replicas[0]
    old_master = cluster.master_of(replica)
    client = _cluster_client(cluster)
    try:
        keys = {f"fo:{i}": str(i) for i in range(100)}
        client.mset_nonatomic(keys)
        with old_master.client() as direct:
            direct.execute_command("WAIT", 1, 2000)

        cluster.failover(replica)

        assert replica in cluster.masters
        assert old_master in cluster.replicas
        assert cluster.master_of(old_master) is replica
        assert len(cluster.masters) == 3
        assert len(cluster.replicas) == 3
        with replica.client() as direct:
            assert direct.info("replication")["role"] == "master"
        with old_master.client() as direct:
            replication = direct.info("replication")
        assert replication["role"] == "slave"
        assert replication["master_port"] == replica.port
        assert replication["master_link_status"] == "up"
        nodes = client.cluster_nodes()
        assert "master" in str(nodes[f"127.0.0.1:{replica.port}"]["flags"])
        assert "slave" in str(nodes[f"127.0.0.1:{old_master.port}"]["flags"])
        # Reads and writes keep working (the client follows the MOVED redirections).
        assert client.mget_nonatomic(list(keys)) == list(keys.values())
        client.set("fo:after", "1")
        assert client.get("fo:after") == "1"
        assert cluster.url == f"redis://127.0.0.1:{cluster.masters[0].port}"
    finally:
        client.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("engine", "kind", "min_version"),
    [("valkey", "valkey", (7, 2)), ("redis6", "redis", (6, 2))],
)
def test_other_engines_form_a_cluster(engine: str, kind: str, min_version: tuple[int, int]) -> None:
    with LocalCluster(engine, masters=3, replicas_per_master=0) as local:
        assert len(local.masters) == 3
        assert local.replicas == []
        node = local.nodes[0]
        assert node.server_kind == kind
        assert node.version >= min_version
        client = _cluster_client(local)
        try:
            keys = {f"eng:{i}": str(i) for i in range(200)}
            client.mset_nonatomic(keys)
            assert client.mget_nonatomic(list(keys)) == list(keys.values())
            assert len({local.master_of_slot(_slot(k)).port for k in keys}) == 3
            assert client.cluster_info()["cluster_state"] == "ok"
            # Resharding works on this engine too.
            slot = _slot("eng:0")
            source = local.master_of_slot(slot)
            target = next(n for n in local.masters if n.port != source.port)
            assert local.migrate_slot(slot, source, target) >= 1
            assert local.master_of_slot(slot).port == target.port
            assert client.get("eng:0") == "0"
        finally:
            client.close()
    assert not any(n.running for n in local.nodes)


@pytest.mark.slow
def test_script_starts_and_stops_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "start", "--masters", "3", "--replicas", "0", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        document = json.loads(line)
        assert document["engine"] == "redis"
        nodes = document["nodes"]
        assert [n["role"] for n in nodes] == ["master"] * 3
        assert document["url"] == f"redis://127.0.0.1:{nodes[0]['port']}"
        client = RedisCluster.from_url(document["url"], decode_responses=True)
        try:
            client.set("script:k", "v")
            assert client.get("script:k") == "v"
        finally:
            client.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    for node in nodes:
        assert not Path(node["dir"]).exists()
        with pytest.raises(ProcessLookupError):
            os.kill(node["pid"], 0)
