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
    assert "expected NAME:PASSWORD" in capsys.readouterr().err



def test_an_anonymous_broker_has_no_logins_but_still_checks_each_user_option(tmp_path, capsys):
    assert main(["broker", "--config-dir", str(tmp_path), "--anonymous", "--no-start"]) == 0
    assert "no logins: anyone who reaches the port may join" in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "credentials.txt").exists()
    assert main(["broker", "--config-dir", str(tmp_path), "--anonymous", "--user", "bob", "--no-start"]) == 2
    assert "--user 'bob': expected NAME:PASSWORD" in capsys.readouterr().err


def test_a_given_login_overrides_the_generated_one(tmp_path, capsys):
    scenario = str(REPO / "scenarios" / "quickstart.yaml")
    assert main(["broker", "--config-dir", str(tmp_path), "--scenario", scenario, "--user", "a:secret", "--no-start"]) == 0
    assert "a:secret" in (tmp_path / "credentials.txt").read_text(encoding="utf-8")


def test_tls_needs_both_the_certificate_and_its_key(tmp_path, capsys):
    assert main(["broker", "--config-dir", str(tmp_path), "--tls-cert", str(tmp_path / "c.pem"), "--no-start"]) == 2
    assert "TLS needs both --tls-cert and --tls-key" in capsys.readouterr().err

@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--run", "runs/x", "--node", "a"], "a run id is 1-64 letters"),
        (["--run", "x", "--node", "a b"], "a node id is 1-64 letters"),
    ],
)
def test_the_node_command_checks_its_run_and_node_ids_before_connecting(args, complaint, capsys):
    assert main(["node", "--broker", "mqtt://127.0.0.1:1", *args]) == 2
    assert complaint in " ".join(capsys.readouterr().err.split())


def test_the_node_command_names_the_failing_preflight_step(capsys):
    assert main(["node", "--broker", "mqtt://127.0.0.1:1", "--run", "x", "--node", "a", "--preflight-only"]) == 2
    out = " ".join("".join(capsys.readouterr()).split())  # progress on stdout, the error on stderr
    assert "preflight DNS: ok" in out and "preflight failed at step 'TCP'" in out and "start the broker" in out


def test_a_host_file_gives_each_host_login_its_nodes_topics_and_no_others(tmp_path, capsys):
    hostfile = tmp_path / "hosts.yaml"
    hostfile.write_text("box: [a, b]\n", encoding="utf-8")
    scenario = str(REPO / "scenarios" / "quickstart.yaml")
    args = ["broker", "--config-dir", str(tmp_path / "conf"), "--scenario", scenario, "--hosts", str(hostfile), "--no-start"]
    assert main(args) == 0
    assert "logins (7, passwords in" in " ".join(capsys.readouterr().out.split())
    assert "\nbox:" in "\n" + (tmp_path / "conf" / "credentials.txt").read_text(encoding="utf-8")
    box = (tmp_path / "conf" / "acl").read_text(encoding="utf-8").split("user box\n")[1].split("\n\n")[0]
    for node in ("a", "b"):  # two lines a node: act as it (join, messages), read its messages
        assert f"topic write collective/+/nodes/{node}/#" in box and f"topic read collective/+/nodes/+/msg/{node}" in box
    # its requests come on coord/to/box (the %u pattern), none on its nodes' request topics
    assert "coord/to" not in box and "/echo" not in box and len(box.splitlines()) == 2 + 2 * 2
    assert "/c/" not in box and "/to/c" not in box and "/d" not in box


@pytest.mark.parametrize(
    ("content", "complaint"),
    [
        ("box: [a, zz]\n", "host 'box': 'zz' is not a node of the scenario"),
        ("a: [b]\n", "host 'a': a host login may not be a node id"),
        ("watcher: [b]\n", "host 'watcher': a host login is 1-64 letters"),
        ("box: []\n", "host 'box': expected a non-empty list of node ids"),
        ("[a, b]\n", "a host file maps each host login to its node ids"),
    ],
)
def test_the_broker_command_names_the_bad_entry_of_a_host_file(tmp_path, capsys, content, complaint):
    hostfile = tmp_path / "hosts.yaml"
    hostfile.write_text(content, encoding="utf-8")
    scenario = str(REPO / "scenarios" / "quickstart.yaml")
    assert main(["broker", "--config-dir", str(tmp_path), "--scenario", scenario, "--hosts", str(hostfile), "--no-start"]) == 2
    out = " ".join(capsys.readouterr().err.split())
    assert str(hostfile) in out and complaint in out, out


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--node", "a", "--nodes", "b,a"], "node a is asked for twice"),
        (["--claim", "2", "--node", "a"], "give it without --node/--nodes"),
        (["--claim", "0"], "--claim N takes N >= 1"),
        ([], "which nodes? --node ID (repeat it), --nodes A,B,... or --claim N"),
        (["--nodes", "a,b c"], "--node 'b c': a node id is 1-64 letters"),
    ],
)
def test_the_node_command_checks_which_nodes_a_host_asks_for_before_connecting(args, complaint, capsys):
    assert main(["node", "--broker", "mqtt://127.0.0.1:1", "--run", "x", *args]) == 2
    assert complaint in " ".join(capsys.readouterr().err.split())


def _said(capsys) -> str:
    """What a command printed, stdout and stderr together (errors may go to either)."""
    captured = capsys.readouterr()
    return " ".join((captured.out + captured.err).split())


@pytest.mark.parametrize("bad", ["+", "#", "a/b", "", "box/+", "coordinator"])
@pytest.mark.parametrize("with_scenario", [False, True])
def test_a_host_file_node_id_that_is_a_wildcard_or_no_node_id_is_refused_with_or_without_a_scenario(
    tmp_path, capsys, bad, with_scenario
):
    hostfile = tmp_path / "hosts.yaml"
    hostfile.write_text(f'gpu-box: [a, "{bad}"]\n', encoding="utf-8")
    scenario = ["--scenario", str(REPO / "scenarios" / "quickstart.yaml")] if with_scenario else []
    args = ["broker", "--config-dir", str(tmp_path / "conf"), *scenario, "--hosts", str(hostfile), "--no-start"]
    assert main(args) == 2
    out = _said(capsys)
    assert str(hostfile) in out and "host 'gpu-box'" in out and f"{bad!r} is not a node id" in out, out
    assert "letters, digits, '-' or '_'" in out or "no node may take" in out, out
    assert not (tmp_path / "conf" / "acl").exists()


def test_an_acl_never_holds_a_wildcard_login_or_node_id():
    from collective.distributed.broker import acl_text

    with pytest.raises(ValueError, match=r"'\+'"):
        acl_text(["coordinator", "box"], {"box": ["+"]})
    with pytest.raises(ValueError, match="'x#'"):
        acl_text(["coordinator", "x#"])


def test_the_broker_command_refuses_a_user_login_that_is_no_login_name(tmp_path, capsys):
    assert main(["broker", "--config-dir", str(tmp_path), "--user", "+:secret", "--no-start"]) == 2
    assert "--user '+': a login is 1-64 letters" in _said(capsys)


@pytest.mark.parametrize("under", [False, True])
def test_a_config_dir_that_is_a_file_or_under_a_file_is_an_error_not_a_traceback(tmp_path, capsys, under):
    afile = tmp_path / "taken"
    afile.write_text("x", encoding="utf-8")
    folder = afile / "conf" if under else afile
    assert main(["broker", "--config-dir", str(folder), "--no-start"]) == 2
    out = _said(capsys)
    assert f"--config-dir {folder}" in out and ("is a file" if not under else f"is under {afile}, which is a file") in out, out
    assert "Traceback" not in out and afile.read_text(encoding="utf-8") == "x"


@pytest.mark.parametrize(
    ("option", "value", "complaint"),
    [
        ("--threads", "-3", "expected a whole number >= 1, got '-3'"),
        ("--threads", "0", "expected a whole number >= 1, got '0'"),
        ("--scenario-timeout", "-5", "expected a number of seconds > 0, got '-5'"),
        ("--scenario-timeout", "0", "expected a number of seconds > 0, got '0'"),
        ("--scenario-timeout", "nan", "expected a number of seconds > 0, got 'nan'"),
        ("--scenario-timeout", "soon", "expected a number of seconds > 0, got 'soon'"),
    ],
)
def test_the_node_command_refuses_a_bad_thread_count_or_timeout_in_the_parser(capsys, option, value, complaint):
    with pytest.raises(SystemExit) as exited:
        main(["node", "--broker", "mqtt://127.0.0.1:1", "--run", "x", "--node", "a", option, value])
    assert exited.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"argument {option}: {complaint}" in err, err
