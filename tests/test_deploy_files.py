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
    assert "--log-format" in capsys.readouterr().out
