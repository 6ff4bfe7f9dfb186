"""The one reconnecting MQTT connection, against a real Mosquitto on 127.0.0.1."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from collective.distributed.connection import Connection
from collective.distributed.mqtt import parse_broker_url
from tests.mosquitto import free_port, running_broker


async def _until(condition, timeout: float = 20.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


@pytest.mark.mqtt
def test_a_connection_comes_back_after_a_broker_restart_and_says_goodbye_on_close(tmp_path):
    with running_broker(tmp_path / "broker") as broker:
        heard: list[tuple[str, bytes]] = []
        connects: list[int] = []
        lost: list[float] = []
        farewells: list[bool] = []

        async def on_message(topic: str, payload: bytes) -> None:
            heard.append((topic, payload))

        async def scenario() -> Connection:
            connection = Connection(
                parse_broker_url(broker.url()),
                role="test",
                subscriptions=["t/in"],
                on_message=on_message,
                on_connect=lambda: _note(connects, connection.connects),
                on_lost=lambda exc, interval: lost.append(interval),
                farewell=lambda interrupted: _note(farewells, interrupted),
            )
            connection.start()
            assert await connection.wait_connected(10)
            assert await connection.publish("t/in", b"one")
            await _until(lambda: len(heard) == 1)
            await asyncio.to_thread(broker.restart)
            await _until(lambda: connects == [0, 1])  # on_connect ran again on the new connection
            assert connection.lost_at is not None and lost and lost[0] == 0.5
            assert await connection.publish("t/in", b"two")
            await _until(lambda: len(heard) == 2)
            await connection.close()
            return connection

        connection = asyncio.run(scenario())
    assert heard == [("t/in", b"one"), ("t/in", b"two")]
    assert farewells == [False] and not connection.connected.is_set()


async def _note(into: list, value: object) -> None:
    into.append(value)


def _nowhere() -> Connection:
    """A connection to a port nobody listens on, that does not retry its first connection."""
    return Connection(parse_broker_url(f"mqtt://127.0.0.1:{free_port()}"), "test", [], _ignore, retry_first=False)


def test_with_retry_first_off_a_broker_that_is_not_there_is_an_error_not_a_retry():
    async def scenario() -> None:
        connection = _nowhere()
        with pytest.raises(aiomqtt.MqttError):
            await asyncio.wait_for(connection.run(), 20)
        assert connection.connects == 0 and not connection.connected.is_set()

    asyncio.run(scenario())


def test_wait_connected_raises_what_ended_the_connection():
    async def scenario() -> None:
        connection = _nowhere()
        connection.start()
        with pytest.raises(aiomqtt.MqttError):
            await connection.wait_connected(20)

    asyncio.run(scenario())


async def _ignore(topic: str, payload: bytes) -> None:
    return None
