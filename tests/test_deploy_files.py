"""The example configs and systemd units in deploy/ stay complete and loadable."""

from __future__ import annotations

import argparse
import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from cloud_node.main import NodeConfig
from edge_agent.main import AgentConfig
from runtimes import config as config_loader

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


@pytest.mark.parametrize(("name", "cls", "prefix"), [("cloud-node.toml", NodeConfig, "TANDEM_NODE"),
                                                      ("edge-agent.toml", AgentConfig, "TANDEM_AGENT")])
def test_example_config_documents_every_setting_and_loads(name: str, cls: type, prefix: str) -> None:
    text = (DEPLOY / name).read_text()
    documented = set(re.findall(r"^#? ?([a-z_]+) = ", text, flags=re.M))
    expected = {f.name for f in dataclasses.fields(cls)} - {"ready_file"}
    assert expected - documented == set(), f"{name} does not document {sorted(expected - documented)}"
    assert documented - expected == set(), f"{name} documents unknown settings {sorted(documented - expected)}"
    config = config_loader.load(cls, argparse.Namespace(config=DEPLOY / name), env_prefix=prefix, environ={})
    assert config.tls() is not None  # the examples are TLS deployments
    assert tomllib.loads(text)  # and plain TOML


@pytest.mark.parametrize("unit", ["tandem-cloud-node.service", "tandem-edge-agent.service"])
def test_systemd_units_start_the_console_scripts_with_the_example_configs(unit: str) -> None:
    text = (DEPLOY / "systemd" / unit).read_text()
    daemon = unit.removeprefix("tandem-").removesuffix(".service")
    assert re.search(rf"^ExecStart=\S+/{daemon} --config /etc/tandem/{daemon}\.toml$", text, flags=re.M)
    assert "ExecReload=/bin/kill -HUP $MAINPID" in text and "KillSignal=SIGTERM" in text
    for section in ("[Unit]", "[Service]", "[Install]"):
        assert section in text


@pytest.mark.parametrize("module", ["cloud_node.main", "edge_agent.main"])
def test_help_lists_every_setting(module: str, capsys) -> None:
    main = __import__(module, fromlist=["main"]).main
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--log-format" in out
    assert "default: None" not in out and "default: ()" not in out  # no default shown where there is none
    assert "(default: false)" in out and "[true|false]" in out       # booleans as typed, switches
    assert "``" not in out                                            # the module docstring's markup
    assert "_MAX_QUEUE" in out                                        # the environment variables are named
    for line in out.splitlines():
        assert line.count("default") <= 1, line                       # a default said once


@pytest.mark.parametrize(("argv", "expected"), [([], True), (["--discovery"], True), (["--discovery", "false"], False),
                                                (["--discovery", "off", "--max-queue", "3"], False),
                                                (["--discovery", "false", "--discovery"], True)])
def test_a_boolean_flag_is_a_switch_that_also_takes_a_value(argv: list[str], expected: bool) -> None:
    parser = argparse.ArgumentParser()
    config_loader.add_arguments(parser, AgentConfig, env_prefix="TANDEM_AGENT")
    args = parser.parse_args(["--plaintext", *argv])  # a switch followed by another flag
    config = config_loader.load(AgentConfig, args, env_prefix="TANDEM_AGENT", environ={})
    assert config.plaintext is True and config.discovery is expected


def test_node_tables_are_read_from_the_file_and_checked(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('plaintext = true\n[[nodes]]\naddress = "oip://10.0.0.5:8001"\nmax_concurrency = 4\n'
                    '[[nodes]]\naddress = "openai+http://10.0.0.6:8000/v1"\nslots = 2\n')
    config = config_loader.load(AgentConfig, argparse.Namespace(config=path), env_prefix="TANDEM_AGENT", environ={})
    assert [(n.address, n.max_concurrency, n.slots) for n in config.nodes] == [
        ("oip://10.0.0.5:8001", 4, 1), ("openai+http://10.0.0.6:8000/v1", 1, 2)]
    path.write_text('plaintext = true\n[[nodes]]\naddress = "oip://10.0.0.5:8001"\nmax_conurrency = 4\n')
    with pytest.raises(config_loader.ConfigError, match=r"nodes: unknown keys \['max_conurrency'\]"):
        config_loader.load(AgentConfig, argparse.Namespace(config=path), env_prefix="TANDEM_AGENT", environ={})
    path.write_text('plaintext = true\n[[nodes]]\naddress = "10.0.0.5:8001"\nkind = "oip"\n'
                    '[[nodes]]\naddress = "http://10.0.0.6:8000/v1"\nkind = "openai"\n')
    config = config_loader.load(AgentConfig, argparse.Namespace(config=path), env_prefix="TANDEM_AGENT", environ={})
    assert [n.target() for n in config.nodes] == ["oip://10.0.0.5:8001", "openai+http://10.0.0.6:8000/v1"]
    path.write_text('plaintext = true\n[[nodes]]\naddress = "oip://10.0.0.5:8001"\nkind = "openai"\n')
    with pytest.raises(config_loader.ConfigError, match="its scheme says oip, its kind openai"):
        config_loader.load(AgentConfig, argparse.Namespace(config=path), env_prefix="TANDEM_AGENT", environ={})
    path.write_text('plaintext = true\n[[nodes]]\nslots = 4\n')
    with pytest.raises(config_loader.ConfigError, match="address"):
        config_loader.load(AgentConfig, argparse.Namespace(config=path), env_prefix="TANDEM_AGENT", environ={})


def test_a_cloud_address_of_no_known_kind_is_refused_by_name() -> None:
    parser = argparse.ArgumentParser()
    config_loader.add_arguments(parser, AgentConfig, env_prefix="TANDEM_AGENT")
    args = parser.parse_args(["--plaintext", "--cloud", "grpc://10.0.0.5:8001"])
    with pytest.raises(config_loader.ConfigError, match="grpc://10.0.0.5:8001.*oip://HOST:PORT"):
        config_loader.load(AgentConfig, args, env_prefix="TANDEM_AGENT", environ={})


def test_the_fleet_examples_parse_and_the_agent_config_loads() -> None:
    """deploy/kubernetes is written on paper (no cluster here): each manifest is
    at least valid YAML naming its kind, and the agent config pointing at them loads."""
    yaml = pytest.importorskip("yaml")
    for manifest in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        documents = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
        assert documents and all(d["apiVersion"] and d["kind"] and d["metadata"]["name"] for d in documents), manifest
    config = config_loader.load(AgentConfig, argparse.Namespace(config=DEPLOY / "edge-agent-fleet.toml"),
                                env_prefix="TANDEM_AGENT", environ={})
    assert [n.address.partition("://")[0] for n in config.nodes] == ["oip", "openai+http"]
