"""What `collective broker` writes: logins, ACLs, packet size, TLS listener (no broker needed)."""

from __future__ import annotations

import base64
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collective.distributed.broker import (
    BrokerSettings,
    TlsFiles,
    acl_text,
    max_packet_size_for,
    password_hash,
    users_for,
    write_broker_config,
)
from collective.distributed.limits import result_bytes_bound
from collective.scenario import parse_scenario


def _scenario(**bus):
    return parse_scenario(
        {
            "name": "s",
            "models": {"m": "x"},
            "corpus": {"train_tokens": 512, "eval_tokens": 64},
            "node_defaults": {"model": "m", "view": {"kind": "window", "tokens": 16}, "message": {"policy": "relay"}},
            "nodes": [{"id": "a"}, {"id": "b"}],
            "bus": bus,
            "evaluation": {"context_tokens": 64},
        }
    )


def test_every_node_gets_a_login_named_after_it_and_the_coordinator_and_watcher_one_too():
    users = users_for(_scenario(), {"a": "given"})
    assert list(users) == ["coordinator", "a", "b", "watcher"] and users["a"] == "given" and len(users["b"]) >= 12
    assert len(users["watcher"]) >= 12


@pytest.mark.parametrize("reserved", ["coordinator", "watcher"])
def test_a_node_may_not_take_the_coordinator_or_watcher_login(reserved):
    scenario = _scenario().model_copy(update={"nodes": [_scenario().nodes[0].model_copy(update={"id": reserved})]})
    with pytest.raises(ValueError, match=reserved):
        users_for(scenario)


def test_the_acl_lets_a_node_publish_only_under_its_own_topics():
    acl = acl_text(["coordinator", "a"])
    assert "pattern write collective/+/nodes/%u/#" in acl
    assert "pattern read collective/+/coord/to/%u" in acl and "pattern read collective/+/nodes/+/msg/%u" in acl
    assert "user coordinator\ntopic readwrite collective/#" in acl
    assert "user a\ntopic read collective/+/coord/scenario" in acl
    assert "write collective/#" not in acl.split("user coordinator")[0]


def test_the_acl_lets_the_watcher_read_the_run_records_and_control_and_nothing_else():
    acl = acl_text(["coordinator", "a", "watcher"])
    watcher = acl.split("user watcher\n")[1].split("\n\n")[0].splitlines()
    assert watcher == ["topic read collective/+/coord/events/#", "topic read collective/+/coord/control"]
    assert "user coordinator\ntopic readwrite collective/#" in acl  # the coordinator writes coord/events/ too
    assert "coord/events" not in acl.split("user a\n")[1].split("\n\n")[0]


def test_the_packet_limit_holds_a_result_of_the_scenario_with_room_to_spare():
    scenario = _scenario(round_tokens=64, max_message_bytes=400)
    bound = result_bytes_bound(64, scenario.evaluation.top_k, 400, 2)
    assert max_packet_size_for(scenario) >= 2 * bound and max_packet_size_for(scenario) >= 1 << 20


def test_the_packet_limit_holds_a_round_record_of_a_large_complete_collective():
    from collective.distributed.limits import link_count, round_event_bytes_bound

    base = _scenario(max_message_tokens=64, max_message_bytes=4000)
    nodes = [base.nodes[0].model_copy(update={"id": f"n{i}"}) for i in range(40)]
    scenario = base.model_copy(update={"nodes": nodes, "topology": base.topology.model_copy(update={"kind": "complete"})})
    assert link_count(scenario) == 40 * 39 and link_count(base) == 2  # a ring of two: a <-> b
    bound = round_event_bytes_bound(40, 40 * 39, 64, 4000)
    assert max_packet_size_for(scenario) >= 2 * bound > 1 << 20


def test_the_password_hash_is_mosquittos_pbkdf2_sha512_format():
    salt = b"0123456789ab"
    text = password_hash("secret", salt=salt)
    _, seven, iterations, salt_b64, key_b64 = text.split("$")
    assert (seven, iterations) == ("7", "101") and base64.b64decode(salt_b64) == salt
    assert base64.b64decode(key_b64) == hashlib.pbkdf2_hmac("sha512", b"secret", salt, 101, dklen=64)


def test_the_config_has_logins_acls_packet_size_and_a_tls_listener(tmp_path: Path):
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    settings = BrokerSettings(
        config_dir=tmp_path / "conf", port=1883, users={"coordinator": "x", "a": "y"}, max_packet_size=123456,
        tls=TlsFiles(cert, key), tls_port=8883,
    )
    files = write_broker_config(settings)
    conf = files.conf.read_text()
    assert "allow_anonymous false" in conf and "max_packet_size 123456" in conf and "persistence false" in conf
    assert f"password_file {files.passwd}" in conf and f"acl_file {files.acl}" in conf
    assert "listener 1883 0.0.0.0" in conf and f"listener 8883 0.0.0.0\ncertfile {cert}\nkeyfile {key}" in conf
    assert files.credentials is not None and files.credentials.read_text() == "coordinator:x\na:y\n"
    assert files.credentials.stat().st_mode & 0o077 == 0
    assert files.passwd is not None and "a:" in files.passwd.read_text() and "y" not in files.passwd.read_text().split(":")[1][:2]


def test_a_config_for_docker_names_the_paths_mosquitto_sees(tmp_path: Path):
    files = write_broker_config(BrokerSettings(config_dir=tmp_path, users={"coordinator": "x"}, mount_dir=Path("/mosquitto/config")))
    conf = files.conf.read_text()
    assert "password_file /mosquitto/config/passwd" in conf and "acl_file /mosquitto/config/acl" in conf


def test_without_logins_the_broker_is_open_and_has_no_acl(tmp_path: Path):
    files = write_broker_config(BrokerSettings(config_dir=tmp_path))
    assert files.passwd is None and files.acl is None and "allow_anonymous true" in files.conf.read_text()


def test_the_compose_broker_and_services_fit_the_quickstart_scenario():
    import yaml

    from collective.scenario import load_scenario

    repo = Path(__file__).resolve().parents[1]
    scenario = load_scenario(repo / "scenarios" / "quickstart.yaml")
    conf = (repo / "docker" / "mosquitto.conf").read_text()
    packet = int(next(line.split()[1] for line in conf.splitlines() if line.startswith("max_packet_size")))
    assert packet >= max_packet_size_for(scenario) and "set_tcp_nodelay true" in conf
    services = yaml.safe_load((repo / "docker-compose.yml").read_text())["services"]
    nodes = {s["command"][s["command"].index("--node") + 1] for name, s in services.items() if name.startswith("node-")}
    assert nodes == set(scenario.node_ids)
    coordinator = services["coordinator"]["command"]
    run_id = coordinator[coordinator.index("--out") + 1].removeprefix("runs/")
    assert all(s["command"][s["command"].index("--run") + 1] == run_id for name, s in services.items() if name.startswith("node-"))
    assert coordinator[:2] == ["run", "scenarios/quickstart.yaml"] and "mqtt://broker:1883" in coordinator


# ---------------------------------------------------------------------------- the running broker


def _children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(child) for child in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    """Running (a zombie, waiting for its parent to reap it, counts as gone)."""
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def _listening(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.mqtt
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_collective_broker_stops_its_mosquitto_and_frees_the_port(tmp_path: Path, sig: signal.Signals):
    from collective.distributed.broker import mosquitto_binary
    from tests.mosquitto import free_port

    if mosquitto_binary() is None or not Path("/proc/self/task").exists():
        pytest.skip("needs mosquitto and Linux's /proc")
    repo = Path(__file__).resolve().parents[1]
    port = free_port()
    command = [sys.executable, "-m", "collective.cli", "broker", "--config-dir", str(tmp_path / "conf"),
               "--scenario", str(repo / "scenarios" / "quickstart.yaml"), "--port", str(port), "--bind", "127.0.0.1"]
    with (tmp_path / "broker.log").open("wb") as log:
        broker = subprocess.Popen(command, cwd=repo, stdout=log, stderr=subprocess.STDOUT)
    children: list[int] = []
    try:
        deadline = time.monotonic() + 30
        while not (_listening(port) and (children := _children(broker.pid))):
            assert broker.poll() is None and time.monotonic() < deadline, (tmp_path / "broker.log").read_text()
            time.sleep(0.05)
        broker.send_signal(sig)  # what `kill PID`, systemd and docker send (SIGTERM), or Ctrl-C (SIGINT)
        code = broker.wait(timeout=20)
        assert not any(_alive(child) for child in children), "mosquitto outlived `collective broker`"
        assert not _listening(port)
        assert code == 0  # stopped as asked
    finally:
        for child in children:  # an orphaned mosquitto must not outlive the test either
            if _alive(child):
                os.kill(child, signal.SIGKILL)
        if broker.poll() is None:
            broker.kill()
            broker.wait()


# ---------------------------------------------------------------------------- host logins on a real broker


def _broker_from_hostfile(tmp_path: Path, hosts_yaml: str, port: int) -> tuple[int, str, Path]:
    """`collective broker --hosts FILE` with no --scenario (logins from --user): its exit code,
    what it said, and the config folder."""
    from collective.cli import main

    hostfile = tmp_path / "hosts.yaml"
    hostfile.write_text(hosts_yaml, encoding="utf-8")
    conf = tmp_path / "conf"
    args = ["broker", "--config-dir", str(conf), "--hosts", str(hostfile), "--user", "coordinator:coord-pass",
            "--user", "box:box-pass", "--port", str(port), "--bind", "127.0.0.1", "--no-start"]
    return main(args), hostfile.read_text(encoding="utf-8"), conf


async def _what_arrives(port: int, topics) -> tuple[list[str], list[str]]:
    """The box login publishes as its node a and as b, c (not its own), and listens to a's, b's
    and its own login's requests (protocol 6: a host's requests come on coord/to/<host>); the
    coordinator listens to every node topic and sends a request to a, b and box."""
    import asyncio
    import contextlib

    import aiomqtt

    heard_box: list[str] = []
    heard_coordinator: list[str] = []
    async with aiomqtt.Client("127.0.0.1", port, username="box", password="box-pass") as box, aiomqtt.Client(
        "127.0.0.1", port, username="coordinator", password="coord-pass"
    ) as coordinator:
        await coordinator.subscribe(f"{topics.root}/nodes/#", qos=1)
        for node in ("a", "b", "box"):
            await box.subscribe(topics.to_node(node), qos=1)
            await coordinator.publish(topics.to_node(node), b"{}", qos=1)
        for topic in (topics.result("b"), topics.status("c"), topics.message("b", "a"), topics.result("a")):
            await box.publish(topic, b"{}", qos=1)
        for client, heard in ((box, heard_box), (coordinator, heard_coordinator)):
            with contextlib.suppress(asyncio.TimeoutError):
                async with asyncio.timeout(1.0):
                    async for message in client.messages:
                        heard.append(str(message.topic))
    return heard_box, heard_coordinator


@pytest.mark.mqtt
@pytest.mark.parametrize("hosts_yaml", ["box: [a]\n", 'box: [a, "+"]\n', 'box: [a, "#"]\n'])
def test_a_host_login_of_a_broker_without_a_scenario_cannot_publish_as_or_read_for_a_node_it_does_not_hold(
    tmp_path: Path, capsys, hosts_yaml: str
):
    import asyncio

    from collective.distributed.broker import mosquitto_binary
    from collective.distributed.protocol import Topics
    from tests.mosquitto import _spawn, free_port

    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    port = free_port()
    code, _, conf = _broker_from_hostfile(tmp_path, hosts_yaml, port)
    captured = capsys.readouterr()
    if code == 2:  # refused: then no configuration exists that a broker could run
        assert '"' in hosts_yaml and "is not a node id" in captured.out + captured.err
        assert not (conf / "acl").exists()
        return
    assert code == 0, captured.out + captured.err
    process = _spawn(conf / "mosquitto.conf", port)
    try:
        topics = Topics("r1")
        heard_box, heard_coordinator = asyncio.run(_what_arrives(port, topics))
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert heard_coordinator == [topics.result("a")], "the broker let box publish as a node it does not hold"
    # a host reads its requests on its own login's topic only: not a node's, held or not
    assert heard_box == [topics.to_node("box")], "the broker let box read a node's requests"
