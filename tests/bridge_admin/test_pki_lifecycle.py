"""`tokenbridge pki` as a certificate lifecycle (issue 19 #3, #6, #7 and the PKI conventions).

Re-issuing keeps a key's mode and group and replaces it atomically; the CRL carries an
increasing CRL Number and the authority key identifier (RFC 5280 §5.2.1, §5.2.3); `revoke`
takes one certificate, never silently all of a name's; keys can be made where they are used
(`sign-csr`) and certificates renewed for the same key; leaves carry KeyUsage
digitalSignature; names are checked; client bundles point at a real server and a status socket.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bridge_admin import cli
from bridge_admin.pki import Pki, PkiError
from bridge_client.config import load_client_config


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _crl_number(path: Path) -> int:
    crl = x509.load_pem_x509_crl(path.read_bytes())
    return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    p = Pki(tmp_path / "pki")
    p.init()
    return p


def _other_group() -> int:
    """A group this process may give files to that is not its own primary group."""
    groups = [g for g in os.getgroups() if g != os.getegid()]
    if os.geteuid() == 0:
        return 65534 if os.getegid() != 65534 else 1
    if not groups:
        pytest.skip("needs root or a supplementary group to chgrp to")
    return groups[0]


def test_reissuing_a_server_key_keeps_its_group_and_mode_and_leaves_no_temporary_file(pki: Pki) -> None:
    first = pki.issue_server(["localhost"])
    assert first.key is not None
    assert stat.S_IMODE(first.key.stat().st_mode) == 0o600  # a new key is private
    group = _other_group()
    os.chown(first.key, -1, group)
    os.chmod(first.key, 0o640)  # what an operator does for a service user in that group
    old_inode = first.key.stat().st_ino
    second = pki.issue_server(["localhost"])
    assert second.key == first.key
    st = first.key.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, group)
    assert st.st_ino != old_inode  # a new file renamed over the old one, not rewritten in place
    assert second.serial != first.serial
    assert not [p.name for p in pki.folder.iterdir() if p.name.endswith(".tmp")]


def test_a_key_never_keeps_bits_for_others(pki: Pki) -> None:
    first = pki.issue_server(["localhost"])
    assert first.key is not None
    os.chmod(first.key, 0o644)
    pki.issue_server(["localhost"])
    assert stat.S_IMODE(first.key.stat().st_mode) == 0o640


def test_crl_numbers_increase_and_the_crl_names_its_issuer_key(pki: Pki) -> None:
    first = _crl_number(pki.crl_path)
    pki.write_crl()
    pki.write_crl(days=7)
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert _crl_number(pki.crl_path) == first + 2
    assert crl.next_update_utc is not None and crl.last_update_utc is not None
    assert 6.9 < (crl.next_update_utc - crl.last_update_utc).total_seconds() / 86400 < 7.1
    aki = crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = _cert(pki.ca_cert_path).extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_the_crl_number_keeps_increasing_past_an_index_that_went_back(pki: Pki, tmp_path: Path) -> None:
    pki.write_crl()
    current = _crl_number(pki.crl_path)
    index = json.loads((pki.folder / "index.json").read_text())
    index["crl_number"] = 0  # an index restored from an old backup
    (pki.folder / "index.json").write_text(json.dumps(index))
    pki.write_crl()
    assert _crl_number(pki.crl_path) == current + 1


def test_pki_crl_days_prints_the_number_and_refuses_silly_lifetimes(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, "pki", "crl", "--dir", str(pki.folder), "--days", "14", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["ok"] and doc["crl_number"] == _crl_number(pki.crl_path)
    code, _, err = _run(capsys, "pki", "crl", "--dir", str(pki.folder), "--days", "0")
    assert code == 2 and "1 to 366 days" in err


def test_revoking_a_name_with_two_certificates_asks_which_and_revokes_one_by_serial(pki: Pki) -> None:
    old = pki.issue_client("build-vm-01")
    new = pki.issue_client("build-vm-01")
    with pytest.raises(PkiError, match=r"2 valid certificates.*--serial.*--all"):
        pki.revoke("build-vm-01")
    assert pki.revoke(serial=old.serial) == [old.serial]
    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(int(old.serial, 16)) is not None
    assert crl.get_revoked_certificate_by_serial_number(int(new.serial, 16)) is None
    assert pki.revoke("build-vm-01") == [new.serial]  # now the only valid one
    with pytest.raises(PkiError, match="no valid certificate"):
        pki.revoke(serial=old.serial)


def test_revoke_all_takes_every_valid_certificate_of_the_name(pki: Pki) -> None:
    a, b = pki.issue_client("build-vm-01"), pki.issue_client("build-vm-01")
    keep = pki.issue_client("build-vm-02")
    assert sorted(pki.revoke("build-vm-01", every=True)) == sorted([a.serial, b.serial])
    states = {r["serial"]: r["revoked"] for r in pki.listing()}
    assert states == {a.serial: True, b.serial: True, keep.serial: False}


def test_leaf_certificates_carry_key_usage_digital_signature_only(pki: Pki) -> None:
    for issued in (pki.issue_server(["localhost"]), pki.issue_client("build-vm-01")):
        ku = _cert(issued.cert).extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.digital_signature
        assert not (ku.value.key_cert_sign or ku.value.crl_sign or ku.value.key_encipherment)


@pytest.mark.parametrize("name", ["", "build vm", "../etc", "a/b", "-x", "x" * 65, "vm_01.", "ümlaut"])
def test_unusable_client_names_are_refused_before_anything_is_written(pki: Pki, name: str) -> None:
    with pytest.raises(PkiError, match="not a usable identity"):
        pki.issue_client(name)
    assert pki.listing() == []


@pytest.mark.parametrize("host", ["token host", "-bad.example", "a..b", "x" * 64 + ".example"])
def test_unusable_server_names_are_refused(pki: Pki, host: str) -> None:
    with pytest.raises(PkiError, match="neither an IP address nor a DNS name"):
        pki.issue_server([host])


def _csr(cn: str, sans: list[str] | None = None) -> tuple[bytes, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), key


def test_sign_csr_certifies_the_requesters_key_with_its_names(pki: Pki, tmp_path: Path) -> None:
    csr, key = _csr("tokenhost.example", ["tokenhost.example", "tokenhost"])
    issued = pki.sign_csr(csr, kind="server", out=tmp_path / "server.pem")
    cert = _cert(issued.cert)
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["tokenhost.example", "tokenhost"]
    assert issued.key is None and not list(tmp_path.glob("*.key"))
    assert [r["name"] for r in pki.listing()] == ["tokenhost.example"]


def test_sign_csr_refuses_a_request_whose_signature_does_not_verify(pki: Pki, tmp_path: Path) -> None:
    csr, _ = _csr("build-vm-01")
    der = bytearray(x509.load_pem_x509_csr(csr).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01  # inside the signature
    tampered = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(PkiError, match="signature does not verify"):
        pki.sign_csr(tampered, kind="client", out=tmp_path / "c.pem")


def test_renew_keeps_the_key_and_names_and_writes_a_new_serial(pki: Pki) -> None:
    first = pki.issue_server(["localhost", "127.0.0.1"])
    assert first.key is not None
    key_before, old = first.key.read_bytes(), _cert(first.cert)
    renewed = pki.renew("localhost", days=30)
    new = _cert(renewed.cert)  # same path: the new one replaced it
    assert renewed.cert == first.cert and first.key.read_bytes() == key_before
    assert new.serial_number != old.serial_number
    assert new.public_key().public_numbers() == old.public_key().public_numbers()  # type: ignore[union-attr]
    assert new.extensions.get_extension_for_class(x509.SubjectAlternativeName) == (
        old.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    )
    assert (new.not_valid_after_utc - new.not_valid_before_utc).days == 30


def test_issue_client_without_server_refuses_instead_of_pointing_at_a_placeholder(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, "pki", "issue-client", "build-vm-01", "--dir", str(pki.folder))
    assert code == 2 and "--server HOST[:PORT] is required" in err
    assert not (pki.folder / "clients").exists()


def test_a_client_bundle_sets_the_status_socket_and_reads_its_key_as_a_credential(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "pki",
        "issue-client",
        "build-vm-01",
        "--server",
        "tokenhost.example:7447",
        "--dir",
        str(pki.folder),
    ]
    code, out, _ = _run(capsys, *argv, "--json")
    doc = json.loads(out)
    assert code == 0 and "client.yaml" in doc["files"]
    config = load_client_config(Path(doc["folder"]) / "client.yaml")
    assert config.status_socket == Path("/run/tokenbridge/client.sock")
    assert config.tls.key.name == "tokenbridge-client.key"
    assert "allow:" in doc["next"][-1]


def test_an_admin_bundle_says_to_list_the_name_in_admins(
    pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["pki", "issue-client", "ops-laptop", "--admin", "--no-config", "--dir", str(pki.folder)]
    code, out, _ = _run(capsys, *argv)
    assert code == 0 and "add 'ops-laptop' to `admins:`" in out and "allow" not in out
    assert not (pki.folder / "clients" / "ops-laptop" / "client.yaml").exists()


def test_pki_errors_are_one_line_with_exit_2_and_json_says_so(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, out, err = _run(
        capsys, "pki", "issue-server", "localhost", "--dir", str(tmp_path / "none"), "--json"
    )
    assert code == 2 and json.loads(out)["ok"] is False
    assert err.count("\n") == 1 and "pki init --dir" in err


def test_the_documented_openssl_request_becomes_a_server_certificate_with_its_names(
    pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/ops.md §1's `openssl req` line, run as written (paths moved), then `pki sign-csr`."""
    ops = (Path(__file__).resolve().parents[2] / "docs/ops.md").read_text()
    line = re.search(r"`sudo (openssl req [^`]+)`", ops)
    assert line is not None, "docs/ops.md no longer shows the openssl req line"
    argv = [w.replace("/etc/credstore/", f"{tmp_path}/") for w in shlex.split(line.group(1))]
    subprocess.run(argv, check=True, capture_output=True, cwd=tmp_path, timeout=60)
    assert stat.S_IMODE((tmp_path / "tokenbridge-server.key").stat().st_mode) & 0o077 == 0
    out = tmp_path / "tokenhost.example.pem"
    code, _, err = _run(
        capsys, "pki", "sign-csr", str(tmp_path / "tokenhost.csr"), "--kind", "server", "--out", str(out),
        "--dir", str(pki.folder),
    )  # fmt: skip
    assert code == 0, err
    sans = _cert(out).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["tokenhost.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]


@pytest.mark.parametrize("days", [0, -5, 3651])
def test_a_certificate_lifetime_outside_one_day_to_ten_years_is_refused(pki: Pki, days: int) -> None:
    with pytest.raises(PkiError, match="valid for 1 to 3650 days"):
        pki.issue_client("build-vm-01", days=days)
    assert pki.listing() == []
