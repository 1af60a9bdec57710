"""Generated config files are written with yaml.safe_dump: any value reads back as itself."""

from __future__ import annotations

from pathlib import Path

from bridge_admin.pki import Pki
from bridge_client.config import load_client_config
from protocol.runtime.address import Address


def test_the_client_yaml_of_a_bundle_reads_back_whatever_the_names_hold(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    pki.init()
    tokens = ["codesign", "release: #2", "it's {odd}"]
    issued = pki.issue_client("build-vm-01", server="[::1]:7447", tokens=tokens)
    config = load_client_config(issued.cert.parent / "client.yaml")
    assert config.server_address == Address("::1", 7447)
    assert [r.token for r in config.readers] == tokens
    assert [r.vpcd_port for r in config.readers] == [35963, 35964, 35965]
    assert config.tls.cert == issued.cert
    text = (issued.cert.parent / "client.yaml").read_text()
    assert text.startswith("# tokenbridge-client configuration for build-vm-01")
