"""A real Mosquitto for the `mqtt` tests: 127.0.0.1 only, a free port, a temporary config.

The configuration is written by `collective.distributed.broker` (the code under test),
so the tests also check that what `collective broker` writes is a working broker.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from collective.distributed.broker import (
    BrokerSettings,
    TlsFiles,
    mosquitto_binary,
    write_broker_config,
)


@dataclass
class RunningBroker:
    host: str
    port: int
    config_dir: Path
    process: subprocess.Popen[bytes]
    users: dict[str, str]

    def url(self, user: str | None = None, password: str | None = None, scheme: str = "mqtt") -> str:
        if user is None:
            return f"{scheme}://{self.host}:{self.port}"
        secret = self.users.get(user, "") if password is None else password
        return f"{scheme}://{user}:{secret}@{self.host}:{self.port}"

    def log(self) -> str:
        path = self.config_dir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port (what a broker restart looks like to clients)."""
        self.stop()
        self.process = _spawn(self.config_dir / "mosquitto.conf", self.port)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _spawn(conf: Path, port: int) -> subprocess.Popen[bytes]:
    binary = mosquitto_binary()
    assert binary is not None
    process = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {process.returncode}; see {conf.parent / 'mosquitto.log'}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return process
        time.sleep(0.05)
    process.kill()
    raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{port} within 10 s")


@contextlib.contextmanager
def running_broker(
    config_dir: Path,
    *,
    users: dict[str, str] | None = None,
    tls: TlsFiles | None = None,
    max_packet_size: int = 8 << 20,
    hosts: dict[str, list[str]] | None = None,
) -> Iterator[RunningBroker]:
    """A mosquitto on 127.0.0.1:<free port>, stopped on exit; skips the test when not installed."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto; .ci/run does it)")
    port = free_port()
    settings = BrokerSettings(
        config_dir=config_dir,
        port=port,
        bind="127.0.0.1",
        users=dict(users or {}),
        hosts=dict(hosts or {}),
        max_packet_size=max_packet_size,
        tls=tls,
        tls_port=port,
        plain_listener=tls is None,
        log_to_file=True,
        run_as="root" if os.geteuid() == 0 else None,  # else it drops to a user that cannot read tmp_path
    )
    files = write_broker_config(settings)
    broker = RunningBroker("127.0.0.1", port, config_dir, _spawn(files.conf, port), dict(users or {}))
    try:
        yield broker
    finally:
        broker.stop()
