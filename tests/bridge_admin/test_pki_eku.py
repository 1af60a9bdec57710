"""`tokenbridge pki` issues one role per certificate, as the ends now require (issue 13 item 11)."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from bridge_admin.pki import Pki
from protocol.runtime.tls import purpose_problem

CLIENT, SERVER = ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _usages(path: Path) -> list[x509.ObjectIdentifier]:
    return list(_cert(path).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_the_server_certificate_carries_serverauth_only(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    pki.init()
    issued = pki.issue_server(["tokenhost.example", "127.0.0.1"])
    assert _usages(issued.cert) == [SERVER]
    assert purpose_problem(_cert(issued.cert), needed=SERVER, other=CLIENT) is None
    assert purpose_problem(_cert(issued.cert), needed=CLIENT, other=SERVER) is not None


def test_client_and_admin_certificates_carry_clientauth_only(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    pki.init()
    for issued in (pki.issue_client("build-vm-01"), pki.issue_client("ops-laptop", admin=True)):
        assert _usages(issued.cert) == [CLIENT]
        assert purpose_problem(_cert(issued.cert), needed=CLIENT, other=SERVER) is None
