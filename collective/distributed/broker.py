"""A Mosquitto configuration for a distributed run: listener, logins, ACLs, packet size, TLS.

`write_broker_config(settings)` writes into one folder:

    mosquitto.conf    the listener(s), persistence off, max_packet_size
    passwd            hashed logins (mosquitto_passwd when installed, else the same
                      PBKDF2-SHA512 format written here)
    acl               each node may publish only under collective/<run>/nodes/<its id>/ and
                      read only its own requests and the messages addressed to it; a host
                      login may publish as each node id of its list (`--hosts FILE`) and
                      read their messages, and only those (its requests and results travel
                      on its own login's topics); the coordinator may do anything under collective/; the
                      watcher may only read the runs' event records and control state
    credentials.txt   the plain passwords, for the host to hand out (mode 600)

A node's username is its node id (that is what the ACL's %u patterns match); the
coordinator's is `coordinator`, the read-only watcher's (`collective watch --broker`)
`watcher`. A host login (one process serving several nodes, `collective node --nodes`) is
named in a host file, a mapping login -> node ids (`read_hostfile`). `max_packet_size` is sized from the scenario: a result carries top-K candidates
for every position of a round, far more than a message; a round record carries every
node's message and every link's.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from collective.distributed.limits import DEFAULT_MAX_PACKET_BYTES as DEFAULT_MAX_PACKET_BYTES
from collective.distributed.limits import (
    max_packet_size_for as max_packet_size_for,  # `collective broker` sizes with it
)
from collective.distributed.protocol import COORDINATOR, WATCHER
from collective.scenario import Scenario


@dataclass(frozen=True)
class TlsFiles:
    certfile: Path
    keyfile: Path
    cafile: Path | None = None


@dataclass(frozen=True)
class BrokerSettings:
    config_dir: Path
    port: int = 1883
    bind: str = "0.0.0.0"
    users: dict[str, str] = field(default_factory=dict)  # username -> password; empty: anonymous
    hosts: dict[str, list[str]] = field(default_factory=dict)  # host login -> the node ids it may serve
    max_packet_size: int = DEFAULT_MAX_PACKET_BYTES
    tls: TlsFiles | None = None
    tls_port: int = 8883
    plain_listener: bool = True  # keep the plain port open next to TLS
    mount_dir: Path | None = None  # where mosquitto sees config_dir (e.g. /mosquitto/config in docker)
    log_to_file: bool = False
    run_as: str | None = None  # mosquitto started as root drops to this user (default: mosquitto)


@dataclass(frozen=True)
class BrokerFiles:
    conf: Path
    passwd: Path | None
    acl: Path | None
    credentials: Path | None


def users_for(scenario: Scenario, passwords: dict[str, str] | None = None) -> dict[str, str]:
    """The coordinator, every node and the read-only watcher, each with the given or a fresh
    random password."""
    for reserved, whose in ((COORDINATOR, "the coordinator's"), (WATCHER, "the read-only watcher's")):
        if reserved in scenario.node_ids:
            raise ValueError(f"a node may not be called {reserved!r}: that is {whose} login")
    return fresh_passwords([COORDINATOR, *scenario.node_ids, WATCHER], passwords)


def fresh_passwords(names: list[str], passwords: dict[str, str] | None = None) -> dict[str, str]:
    """Each login with its given password or a fresh random one."""
    given = passwords or {}
    return {name: given.get(name) or secrets.token_urlsafe(12) for name in names}


def read_hostfile(path: Path, node_ids: list[str] | None = None) -> dict[str, list[str]]:
    """A host file (`collective broker --hosts FILE`): a YAML mapping host login -> list of the
    node ids it may serve. Raises ValueError naming the file, the entry and the fix."""
    import yaml

    from collective.scenario import check_node_id

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the host file ({exc})") from None
    if not isinstance(data, dict) or not data:
        raise ValueError(f"{path}: a host file maps each host login to its node ids, e.g. `gpu-box: [a, b, c]`")
    hosts: dict[str, list[str]] = {}
    for login, nodes in data.items():
        where = f"{path}: host {login!r}"
        if not isinstance(login, str) or not check_node_id(login) or login in (COORDINATOR, WATCHER):
            raise ValueError(f"{where}: a host login is 1-64 letters, digits, '-' or '_', and not {COORDINATOR!r} or {WATCHER!r}")
        if node_ids is not None and login in node_ids:
            raise ValueError(f"{where}: a host login may not be a node id of the scenario (that node's login); rename the host")
        if not isinstance(nodes, list) or not nodes or not all(isinstance(n, str) for n in nodes):
            raise ValueError(f"{where}: expected a non-empty list of node ids, e.g. [a, b]")
        _check_host_nodes(where, nodes)
        unknown = [n for n in nodes if node_ids is not None and n not in node_ids]
        if unknown:
            raise ValueError(f"{where}: {', '.join(map(repr, unknown))} is not a node of the scenario (its nodes: {', '.join(node_ids or [])})")
        hosts[login] = list(dict.fromkeys(nodes))
    return hosts


def _check_host_nodes(where: str, nodes: list[str]) -> None:
    """Each node id of a host's list passes the scenario's own node id check, with or without a
    scenario: an id goes into the ACL's topics, where `+` or `#` would be a wildcard (`gpu-box:
    ["+"]` would let that login write as every node and read every node's mail)."""
    from collective.scenario import check_node_id

    for node in nodes:
        if not check_node_id(node):
            raise ValueError(
                f"{where}: {node!r} is not a node id: a node id is 1-64 letters, digits, '-' or '_' "
                "(no MQTT wildcard '+' or '#', no '/', not empty)"
            )
        if node in (COORDINATOR, WATCHER):
            raise ValueError(f"{where}: {node!r} is not a node id: that is the {node} login, which no node may take")


def password_hash(password: str, salt: bytes | None = None, iterations: int = 101) -> str:
    """Mosquitto 2's `$7$` format: PBKDF2-HMAC-SHA512, base64 salt and key."""
    salt = salt or secrets.token_bytes(12)
    key = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, dklen=64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(key).decode()}"


def write_password_file(path: Path, users: dict[str, str]) -> None:
    """Hashed logins; through mosquitto_passwd when installed (its own format is the reference)."""
    tool = shutil.which("mosquitto_passwd")
    path.write_text("", encoding="utf-8")
    os.chmod(path, 0o600)
    if tool is not None:
        for user, password in users.items():
            subprocess.run([tool, "-b", str(path), user, password], check=True, capture_output=True)
        return
    path.write_text("".join(f"{user}:{password_hash(password)}\n" for user, password in users.items()), encoding="utf-8")


def acl_text(users: list[str], hosts: dict[str, list[str]] | None = None) -> str:
    """The coordinator may do anything under collective/; the watcher reads only the runs'
    event records and control state; every other login (%u = its username = its node id)
    publishes only under its own node topics and reads only the run's scenario and control,
    its own requests, and the messages addressed to it; a host login (`hosts`) may in addition
    publish as each node id of its list (its join and its messages) and read the messages to
    it, and no other: the host's requests and results go on its own login's topics (two lines
    a node, where a node served alone through its own topics would need four). (The patterns apply to the watcher and
    the hosts too: under nodes/<login>/ a host publishes its claims and its preflight echo;
    the watcher could publish there, which every party drops: no node has that id.)"""
    from collective.scenario import check_node_id

    unsafe = [name for name in [*users, *(n for nodes in (hosts or {}).values() for n in nodes)] if not check_node_id(name)]
    if unsafe:  # a wildcard, '/', space or newline would widen or forge ACL lines
        raise ValueError(f"ACL: {', '.join(map(repr, unsafe))} is not a login or node id (1-64 letters, digits, '-' or '_')")
    lines = [
        "# written by `collective broker` (topics: collective/distributed/protocol.py)",
        "pattern write collective/+/nodes/%u/#",
        "pattern read collective/+/nodes/%u/echo",
        "pattern read collective/+/coord/to/%u",
        "pattern read collective/+/nodes/+/msg/%u",
        "",
        f"user {COORDINATOR}",
        "topic readwrite collective/#",
    ]
    for user in users:
        if user == WATCHER:
            lines += ["", f"user {user}", "topic read collective/+/coord/events/#", "topic read collective/+/coord/control"]
        elif user != COORDINATOR:
            lines += ["", f"user {user}", "topic read collective/+/coord/scenario", "topic read collective/+/coord/control"]
            for node in (hosts or {}).get(user, []):  # its requests and results travel under its own login's topics
                lines += [f"topic write collective/+/nodes/{node}/#", f"topic read collective/+/nodes/+/msg/{node}"]
    return "\n".join(lines) + "\n"


def mosquitto_conf(settings: BrokerSettings, files: BrokerFiles) -> str:
    seen = settings.mount_dir or settings.config_dir.resolve()

    def where(path: Path) -> str:
        return str(seen / path.name)

    lines = [
        "# written by `collective broker`; start with: mosquitto -c mosquitto.conf",
        "per_listener_settings false",
        "persistence false",
        f"max_packet_size {settings.max_packet_size}",
        "max_queued_messages 10000",
        "set_tcp_nodelay true",  # many small envelopes: Nagle would hold each back up to 40 ms
        f"allow_anonymous {'false' if settings.users else 'true'}",
    ]
    if files.passwd is not None:
        lines.append(f"password_file {where(files.passwd)}")
    if files.acl is not None:
        lines.append(f"acl_file {where(files.acl)}")
    if settings.run_as is not None:
        lines.append(f"user {settings.run_as}")
    if settings.log_to_file:
        lines.append(f"log_dest file {seen / 'mosquitto.log'}")
    else:
        lines.append("log_dest stderr")
    lines += ["log_type error", "log_type warning", "log_type notice", "connection_messages true", ""]
    if settings.plain_listener or settings.tls is None:
        lines += [f"listener {settings.port} {settings.bind}", ""]
    if settings.tls is not None:
        lines += [
            f"listener {settings.tls_port} {settings.bind}",
            f"certfile {settings.tls.certfile if settings.mount_dir is None else where(settings.tls.certfile)}",
            f"keyfile {settings.tls.keyfile if settings.mount_dir is None else where(settings.tls.keyfile)}",
        ]
        if settings.tls.cafile is not None:
            lines.append(f"cafile {settings.tls.cafile if settings.mount_dir is None else where(settings.tls.cafile)}")
        lines.append("")
    return "\n".join(lines)


def write_broker_config(settings: BrokerSettings) -> BrokerFiles:
    folder = settings.config_dir
    folder.mkdir(parents=True, exist_ok=True)
    passwd = acl = credentials = None
    if settings.users:
        passwd, acl, credentials = folder / "passwd", folder / "acl", folder / "credentials.txt"
        write_password_file(passwd, settings.users)
        if settings.mount_dir is not None:  # the container's mosquitto user must read it
            os.chmod(passwd, 0o644)
        acl.write_text(acl_text(list(settings.users), settings.hosts), encoding="utf-8")
        credentials.write_text("".join(f"{u}:{p}\n" for u, p in settings.users.items()), encoding="utf-8")
        os.chmod(credentials, 0o600)
    files = BrokerFiles(folder / "mosquitto.conf", passwd, acl, credentials)
    files.conf.write_text(mosquitto_conf(settings, files), encoding="utf-8")
    return files


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or next(
        (str(p) for p in (Path("/usr/sbin/mosquitto"), Path("/usr/local/sbin/mosquitto")) if p.exists()), None
    )


def start_instructions(files: BrokerFiles) -> str:
    folder = files.conf.parent.resolve()
    return (
        "Mosquitto is not installed here. Either install it (Debian/Ubuntu: `sudo apt-get install mosquitto`, "
        f"macOS: `brew install mosquitto`) and run `mosquitto -c {files.conf.resolve()}`, or run it in docker "
        f"(write the folder with --mount-dir /mosquitto/config): `docker run --rm -p 1883:1883 -v {folder}:/mosquitto/config "
        "eclipse-mosquitto:2`."
    )


def start_broker(files: BrokerFiles, binary: str) -> subprocess.Popen[bytes]:
    """Start mosquitto on the written configuration (the caller waits on or stops it)."""
    return subprocess.Popen([binary, "-c", str(files.conf.resolve())])


FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
STOP_GRACE_S = 10.0  # after a forwarded signal, how long mosquitto gets before it is killed


def run_broker(files: BrokerFiles, binary: str) -> int:
    """Run mosquitto in the foreground until it exits: SIGTERM and SIGINT sent to this process
    (`kill PID`, systemd, docker, Ctrl-C) go on to mosquitto, and this process waits for it, so
    that it never outlives us holding the port. Returns mosquitto's exit status, 0 when it
    stopped because it was asked to."""
    stopping: list[int] = []
    started: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, frame: object) -> None:
        stopping.append(signum)
        for process in started:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)

    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
    previous = {sig: signal.signal(sig, forward) for sig in FORWARDED_SIGNALS} if main_thread else {}
    try:
        started.append(start_broker(files, binary))
        if stopping:  # a signal came while it was starting
            forward(stopping[0], None)
        return _wait_for_broker(started[0], stopping)
    finally:
        for process in started:
            if process.poll() is None:  # only when this process itself fails
                process.kill()
                process.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_for_broker(process: subprocess.Popen[bytes], stopping: list[int]) -> int:
    """Until mosquitto exits; once asked to stop (`stopping`), it gets STOP_GRACE_S."""
    kill_at: float | None = None
    while True:
        try:
            code = process.wait(timeout=0.2)
            return 0 if stopping else code
        except subprocess.TimeoutExpired:
            if stopping and kill_at is None:
                kill_at = time.monotonic() + STOP_GRACE_S
            if kill_at is not None and time.monotonic() > kill_at:  # asked to stop and did not
                process.kill()
