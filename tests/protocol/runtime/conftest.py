"""Test certificates for the runtime TLS tests: one private CA, one foreign CA, leaf certs."""

from __future__ import annotations

import pytest
import trustme
from runtime_tls_helpers import CertFiles, Pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    ca_file = root / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    partial = Pki(ca, ca_file, CertFiles(root / "x", root / "x"), CertFiles(root / "x", root / "x"), root)
    server = partial.issue("server", "bridge.example", common_name="bridge-server", role="server")
    client = partial.issue("client", "builder-07.ci.example", "b7.ci.example", common_name="builder-07")
    return Pki(ca, ca_file, server, client, root)
