"""A small deployment PKI: one CA, server and client certificates, a CRL.

Mutual TLS only gets used if it is easy to set up. This module makes the files the daemons
need with sensible lifetimes and names, and writes every private key 0600.

Layout of a PKI folder:
    ca.pem, ca.key                the deployment CA (keep ca.key offline if you can)
    crl.pem                       the revocation list the server loads (fail closed if stale)
    server.pem, server.key        a server certificate (SANs: DNS names and IPs)
    clients/NAME/                 a client bundle: NAME.pem, NAME.key, ca.pem, client.yaml
    index.json                    what was issued and revoked (serials, names, expiry)
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.errors import BridgeError
from protocol.runtime.address import Address
from protocol.runtime.config import dump_yaml
from protocol.vpcd import DEFAULT_PORT as VPCD_PORT
from protocol.wire import DEFAULT_PORT as SERVER_PORT

CA_DAYS = 3650
LEAF_DAYS = 397
CRL_DAYS = 30
ADMIN_OU = "tokenbridge-admin"


class PkiError(BridgeError):
    """The PKI folder is missing something or a request cannot be honoured."""


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class Pki:
    """A PKI folder (see module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @property
    def ca_cert_path(self) -> Path:
        return self.folder / "ca.pem"

    @property
    def crl_path(self) -> Path:
        return self.folder / "crl.pem"

    def _index(self) -> dict[str, Any]:
        path = self.folder / "index.json"
        if not path.exists():
            return {"issued": [], "revoked": []}
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def _save_index(self, index: dict[str, Any]) -> None:
        tmp = self.folder / "index.json.tmp"
        tmp.write_text(json.dumps(index, indent=2))
        tmp.replace(self.folder / "index.json")

    def init(self, *, name: str = "tokenbridge deployment CA", force: bool = False) -> Path:
        """Create the CA and an empty CRL. Refuses to overwrite an existing CA unless forced."""
        if self.ca_cert_path.exists() and not force:
            raise PkiError(f"{self.ca_cert_path} already exists; refusing to replace the CA (use --force)")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_private(self.folder / "ca.key", _key_pem(key))
        _write_public(self.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM))
        self._save_index({"issued": [], "revoked": []})
        self.write_crl()
        return self.ca_cert_path

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        try:
            cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
            key = serialization.load_pem_private_key((self.folder / "ca.key").read_bytes(), None)
        except FileNotFoundError as exc:
            raise PkiError(
                f"no CA in {self.folder}: run `tokenbridge pki init --dir {self.folder}` first"
            ) from exc
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key

    def _issue(
        self,
        name: str,
        *,
        dns: list[str],
        ips: list[str],
        server: bool,
        admin: bool,
        days: int,
        out: Path,
        not_before: dt.datetime | None = None,
    ) -> Issued:
        ca_cert, ca_key = self._ca()
        key = ec.generate_private_key(ec.SECP256R1())
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
        if admin:
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ADMIN_OU))
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        start = not_before or (_now() - dt.timedelta(minutes=5))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        issued = Issued(cert=out / f"{name}.pem", key=out / f"{name}.key")
        _write_private(issued.key, _key_pem(key))
        _write_public(issued.cert, cert.public_bytes(serialization.Encoding.PEM))
        index = self._index()
        index["issued"].append(
            {
                "name": name,
                "serial": format(cert.serial_number, "x"),
                "kind": "server" if server else ("admin" if admin else "client"),
                "not_after": cert.not_valid_after_utc.isoformat(),
                "cert": str(issued.cert),
            }
        )
        self._save_index(index)
        return issued

    def issue_server(self, names: list[str], *, days: int = LEAF_DAYS, out: Path | None = None) -> Issued:
        """A server certificate whose SANs are the given DNS names and IP addresses."""
        if not names:
            raise PkiError("give at least one host name or IP address for the server certificate")
        dns = [n for n in names if not _is_ip(n)]
        ips = [n for n in names if _is_ip(n)]
        issued = self._issue(
            names[0], dns=dns, ips=ips, server=True, admin=False, days=days, out=out or self.folder
        )
        return issued

    def issue_client(
        self,
        name: str,
        *,
        admin: bool = False,
        days: int = LEAF_DAYS,
        out: Path | None = None,
        server: str = f"tokenhost.example:{SERVER_PORT}",
        tokens: list[str] | None = None,
        not_before: dt.datetime | None = None,
    ) -> Issued:
        """A client bundle: key, certificate, the CA and a ready client.yaml."""
        folder = out or (self.folder / "clients" / name)
        issued = self._issue(
            name,
            dns=[name] if _dns_ok(name) else [],
            ips=[],
            server=False,
            admin=admin,
            days=days,
            out=folder,
            not_before=not_before,
        )
        _write_public(folder / "ca.pem", self.ca_cert_path.read_bytes())
        readers = [
            {"token": tok, "vpcd": {"connect": str(Address("127.0.0.1", VPCD_PORT + i))}}
            for i, tok in enumerate(tokens or ["codesign"])
        ]
        document = {
            "server": server,
            "tls": {"ca": "ca.pem", "cert": f"{name}.pem", "key": f"{name}.key"},
            "readers": readers,
        }
        comment = f"tokenbridge-client configuration for {name} (generated by `tokenbridge pki issue-client`)"
        (folder / "client.yaml").write_text(dump_yaml(document, comment=comment))
        return issued

    def revoke(self, name: str) -> list[str]:
        """Revoke every certificate issued to `name`; rewrite the CRL. Returns the serials."""
        index = self._index()
        serials = [e["serial"] for e in index["issued"] if e["name"] == name]
        if not serials:
            raise PkiError(f"no certificate was issued to {name!r} from {self.folder}")
        now = _now().isoformat()
        known = {r["serial"] for r in index["revoked"]}
        for serial in serials:
            if serial not in known:
                index["revoked"].append({"name": name, "serial": serial, "revoked_at": now})
        self._save_index(index)
        self.write_crl()
        return serials

    def write_crl(self, *, days: int = CRL_DAYS) -> Path:
        ca_cert, ca_key = self._ca()
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=days))
        )
        for entry in self._index()["revoked"]:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(entry["serial"], 16))
                .revocation_date(dt.datetime.fromisoformat(entry["revoked_at"]))
                .build()
            )
        crl = builder.sign(ca_key, hashes.SHA256())
        tmp = self.crl_path.with_suffix(".tmp")
        tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
        tmp.replace(self.crl_path)
        return self.crl_path

    def listing(self) -> list[dict[str, Any]]:
        index = self._index()
        revoked = {r["serial"] for r in index["revoked"]}
        return [{**e, "revoked": e["serial"] in revoked} for e in index["issued"]]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _dns_ok(name: str) -> bool:
    return all(c.isalnum() or c in "-." for c in name) and not _is_ip(name)
