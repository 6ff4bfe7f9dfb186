"""`collective node` and `collective broker`: argument checks and what they print (no broker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from collective.cli import main
from collective.distributed import broker

REPO = Path(__file__).resolve().parents[1]


def test_without_mosquitto_the_broker_command_writes_the_config_and_says_how_to_start_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(broker, "mosquitto_binary", lambda: None)
    code = main(["broker", "--config-dir", str(tmp_path), "--scenario", str(REPO / "scenarios" / "quickstart.yaml")])
    out = " ".join(capsys.readouterr().out.split())
    assert code == 0
    assert "logins (6, passwords in" in out and "coordinator, a, b, c, d, watcher" in out
    assert "collective watch --broker mqtt://watcher:PASSWORD@HOST:1883 --run RUN_ID" in out
    assert "Mosquitto is not installed here" in out and "apt-get install mosquitto" in out and "eclipse-mosquitto:2" in out
    assert (tmp_path / "mosquitto.conf").exists() and (tmp_path / "acl").exists() and (tmp_path / "credentials.txt").exists()


def test_the_broker_command_refuses_a_user_without_a_password(tmp_path, capsys):
    assert main(["broker", "--config-dir", str(tmp_path), "--user", "alice", "--no-start"]) == 2
    assert "expected NAME:PASSWORD" in capsys.readouterr().out



def test_an_anonymous_broker_has_no_logins_but_still_checks_each_user_option(tmp_path, capsys):
    assert main(["broker", "--config-dir", str(tmp_path), "--anonymous", "--no-start"]) == 0
    assert "no logins: anyone who reaches the port may join" in " ".join(capsys.readouterr().out.split())
    assert not (tmp_path / "credentials.txt").exists()
    assert main(["broker", "--config-dir", str(tmp_path), "--anonymous", "--user", "bob", "--no-start"]) == 2
    assert "--user 'bob': expected NAME:PASSWORD" in capsys.readouterr().out


def test_a_given_login_overrides_the_generated_one(tmp_path, capsys):
    scenario = str(REPO / "scenarios" / "quickstart.yaml")
    assert main(["broker", "--config-dir", str(tmp_path), "--scenario", scenario, "--user", "a:secret", "--no-start"]) == 0
    assert "a:secret" in (tmp_path / "credentials.txt").read_text(encoding="utf-8")


def test_tls_needs_both_the_certificate_and_its_key(tmp_path, capsys):
    assert main(["broker", "--config-dir", str(tmp_path), "--tls-cert", str(tmp_path / "c.pem"), "--no-start"]) == 2
    assert "TLS needs both --tls-cert and --tls-key" in capsys.readouterr().out

@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--run", "runs/x", "--node", "a"], "a run id is 1-64 letters"),
        (["--run", "x", "--node", "a b"], "a node id is 1-64 letters"),
    ],
)
def test_the_node_command_checks_its_run_and_node_ids_before_connecting(args, complaint, capsys):
    assert main(["node", "--broker", "mqtt://127.0.0.1:1", *args]) == 2
    assert complaint in " ".join(capsys.readouterr().out.split())


def test_the_node_command_names_the_failing_preflight_step(capsys):
    assert main(["node", "--broker", "mqtt://127.0.0.1:1", "--run", "x", "--node", "a", "--preflight-only"]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert "preflight DNS: ok" in out and "preflight failed at step 'TCP'" in out and "start the broker" in out
