"""Broker URLs and what a refused connection is reported as (no broker needed)."""

from __future__ import annotations

import pytest
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from collective.distributed.mqtt import DistributedError, describe_connect_error, parse_broker_url


def test_a_plain_url_defaults_to_port_1883_and_no_login():
    address = parse_broker_url("mqtt://broker")
    assert (address.host, address.port, address.tls, address.username) == ("broker", 1883, False, None)


def test_an_mqtts_url_defaults_to_port_8883_and_reads_its_tls_options():
    address = parse_broker_url("mqtts://n0:s%40cret@example.org?ca=/etc/ca.pem&insecure=1")
    assert (address.port, address.tls, address.username, address.password) == (8883, True, "n0", "s@cret")
    assert address.ca_file == "/etc/ca.pem" and address.insecure


def test_the_displayed_url_never_shows_the_password():
    address = parse_broker_url("mqtt://n0:hunter2@10.0.0.5:1999")
    assert address.display() == "mqtt://n0@10.0.0.5:1999" and "hunter2" not in repr(address)


def test_the_coordinator_reads_its_deadline_from_the_url_and_others_refuse_it():
    assert parse_broker_url("mqtt://h?deadline=12", allowed_options=("deadline",)).option("deadline") == "12"
    with pytest.raises(DistributedError, match="unknown option 'deadline'"):
        parse_broker_url("mqtt://h?deadline=12")


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("http://h:1883", "expected mqtt://"),
        ("mqtt://", "names no host"),
        ("mqtt://h:99999", "port"),
        ("mqtts://h?cert=/c.pem", "both cert=FILE and key=FILE"),
    ],
)
def test_a_bad_url_says_what_is_wrong(url, complaint):
    with pytest.raises(DistributedError, match=complaint):
        parse_broker_url(url)


def test_a_refused_login_is_explained_with_what_to_do():
    address = parse_broker_url("mqtt://a:wrong@h")
    refused = MqttConnectError(ReasonCode(PacketTypes.CONNACK, identifier=135))
    message = describe_connect_error(address, refused)
    assert "refused the login of user 'a'" in message and "password" in message and "wrong" not in address.display()
    anonymous = describe_connect_error(parse_broker_url("mqtt://h"), refused)
    assert "refuses anonymous clients" in anonymous
