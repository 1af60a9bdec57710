"""A small deployment PKI: one CA, server and client certificates, a CRL.

Mutual TLS only gets used if it is easy to set up. This module makes the files the daemons
need with sensible lifetimes and names. Every file is replaced atomically and keeps the owner,
group and mode it had (`pki_files.write_file`), so re-issuing never locks the service out.

Layout of a PKI folder:
    ca.pem, ca.key                the deployment CA (keep ca.key offline if you can)
    crl.pem                       the revocation list the server loads (fail closed if stale)
    HOST.pem, HOST.key            a server certificate (SANs: DNS names and IPs)
    clients/NAME/                 a client bundle: NAME.pem, NAME.key, ca.pem, client.yaml
    index.json                    what was issued and revoked (serials, names, expiry), CRL number

Keys can also be made where they are used (`sign_csr`): the CA then only ever sees the public
key. `renew` re-signs the public key of a certificate already issued, so the key file (and a
systemd credential holding it) stays as it is and a reload picks up the new certificate.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridge_admin.pki_files import PkiError, check_host, check_identity, dns_ok, is_ip, write_file
from protocol.runtime.address import Address
from protocol.runtime.config import dump_yaml
from protocol.vpcd import DEFAULT_PORT as VPCD_PORT

__all__ = ["ADMIN_OU", "CRL_DAYS", "Issued", "Pki", "PkiError"]

CA_DAYS: Final = 3650
LEAF_DAYS: Final = 397
CRL_DAYS: Final = 30
ADMIN_OU: Final = "tokenbridge-admin"
DEFAULT_CLIENT_STATUS_SOCKET: Final = "/run/tokenbridge/client.sock"
KINDS: Final = ("server", "client", "admin")
# RFC 5280 §4.2.1.3 + RFC 8446 §4.4.3: a TLS 1.3 leaf only signs the handshake transcript.
LEAF_KEY_USAGE: Final = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
CA_KEY_USAGE: Final = x509.KeyUsage(False, False, False, False, False, True, True, False, False)

PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path | None  # None when the key was made elsewhere (sign-csr) or kept (renew)
    name: str
    serial: str
    kind: str
    not_after: str

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "serial": self.serial, "not_after": self.not_after,
            "cert": str(self.cert), "key": None if self.key is None else str(self.key),
        }  # fmt: skip


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem(obj: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return obj.public_bytes(serialization.Encoding.PEM)


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
            return {"issued": [], "revoked": [], "crl_number": 0}
        data: dict[str, Any] = json.loads(path.read_text())
        return data

    def _save_index(self, index: dict[str, Any]) -> None:
        write_file(self.folder / "index.json", json.dumps(index, indent=2).encode(), private=False)

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
            .add_extension(CA_KEY_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        write_file(self.folder / "ca.key", _key_pem(key), private=True)
        write_file(self.ca_cert_path, _pem(cert), private=False)
        self._save_index({"issued": [], "revoked": [], "crl_number": 0})
        self.write_crl()
        return self.ca_cert_path

    def _ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        try:
            cert = x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())
            key = serialization.load_pem_private_key((self.folder / "ca.key").read_bytes(), None)
        except FileNotFoundError as exc:
            raise PkiError(
                f"no CA in {self.folder} ({exc.filename} is missing): run "
                f"`tokenbridge pki init --dir {self.folder}` first, or run this where the CA key is"
            ) from exc
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cert, key

    def _sign(
        self, public_key: PublicKey, name: str, *, sans: list[str], kind: str, days: int,
        not_before: dt.datetime | None = None,
    ) -> x509.Certificate:  # fmt: skip
        if not 1 <= days <= CA_DAYS:
            raise PkiError(f"--days {days}: a certificate must be valid for 1 to {CA_DAYS} days")
        ca_cert, ca_key = self._ca()
        attrs = [x509.NameAttribute(NameOID.COMMON_NAME, name)]
        if kind == "admin":
            attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ADMIN_OU))
        san_values: list[x509.GeneralName] = [
            x509.IPAddress(ipaddress.ip_address(s)) if is_ip(s) else x509.DNSName(s) for s in sans
        ]
        eku = ExtendedKeyUsageOID.SERVER_AUTH if kind == "server" else ExtendedKeyUsageOID.CLIENT_AUTH
        start = not_before or (_now() - dt.timedelta(minutes=5))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attrs))
            .issuer_name(ca_cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(LEAF_KEY_USAGE, critical=True)
            .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        if san_values:
            builder = builder.add_extension(x509.SubjectAlternativeName(san_values), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    def _record(self, cert: x509.Certificate, name: str, kind: str, path: Path, key: Path | None) -> Issued:
        write_file(path, _pem(cert), private=False)
        issued = Issued(
            cert=path, key=key, name=name, serial=format(cert.serial_number, "x"), kind=kind,
            not_after=cert.not_valid_after_utc.isoformat(),
        )  # fmt: skip
        index = self._index()
        entry = {k: v for k, v in issued.as_json().items() if k != "key"}
        index["issued"].append({**entry, "cert": str(path.resolve())})
        self._save_index(index)
        return issued

    def _issue_with_new_key(
        self, name: str, *, sans: list[str], kind: str, days: int, out: Path,
        not_before: dt.datetime | None = None,
    ) -> Issued:  # fmt: skip
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._sign(key.public_key(), name, sans=sans, kind=kind, days=days, not_before=not_before)
        key_path = out / f"{name}.key"
        write_file(key_path, _key_pem(key), private=True)
        return self._record(cert, name, kind, out / f"{name}.pem", key_path)

    def issue_server(self, names: list[str], *, days: int = LEAF_DAYS, out: Path | None = None) -> Issued:
        """A server certificate whose SANs are the given DNS names and IP addresses."""
        if not names:
            raise PkiError("give at least one host name or IP address for the server certificate")
        sans = [check_host(n) for n in names]
        return self._issue_with_new_key(names[0], sans=sans, kind="server", days=days, out=out or self.folder)

    def issue_client(
        self,
        name: str,
        *,
        admin: bool = False,
        days: int = LEAF_DAYS,
        out: Path | None = None,
        server: str | None = None,
        tokens: list[str] | None = None,
        status_socket: str = DEFAULT_CLIENT_STATUS_SOCKET,
        key_credential: str | None = None,
        not_before: dt.datetime | None = None,
    ) -> Issued:
        """A client bundle: key, certificate, the CA and, given the server's address, a client.yaml
        whose `tls.key` is the bundle's key file, or with `key_credential` that systemd credential."""
        check_identity(name)
        folder = out or (self.folder / "clients" / name)
        issued = self._issue_with_new_key(
            name, sans=[name] if dns_ok(name) else [], kind="admin" if admin else "client", days=days,
            out=folder, not_before=not_before,
        )  # fmt: skip
        write_file(folder / "ca.pem", self.ca_cert_path.read_bytes(), private=False)
        if server is not None:
            key = f"credential:{key_credential}" if key_credential else f"{name}.key"
            self._write_client_yaml(folder, name, server, tokens or ["codesign"], status_socket, key)
        return issued

    def _write_client_yaml(
        self, folder: Path, name: str, server: str, tokens: list[str], status_socket: str, key: str
    ) -> None:
        readers = [
            {"token": tok, "vpcd": {"connect": str(Address("127.0.0.1", VPCD_PORT + i))}}
            for i, tok in enumerate(tokens)
        ]
        document = {
            "server": server,
            "tls": {"ca": "ca.pem", "cert": f"{name}.pem", "key": key},
            "readers": readers,
            "status": {"socket": status_socket},
        }
        comment = f"tokenbridge-client configuration for {name} (generated by `tokenbridge pki issue-client`)"
        text = dump_yaml(document, comment=comment).encode()
        write_file(folder / "client.yaml", text, private=False)

    def sign_csr(self, csr_pem: bytes, *, kind: str, days: int = LEAF_DAYS, out: Path) -> Issued:
        """A certificate for a key made elsewhere: CN (and for a server, SANs) from the request."""
        if kind not in KINDS:
            raise PkiError(f"unknown kind {kind!r}: one of {', '.join(KINDS)}")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise PkiError(f"not a PEM certificate signing request ({exc})") from exc
        if not csr.is_signature_valid:
            raise PkiError("the request's signature does not verify: it was not made with its key")
        public_key = _usable_public_key(csr.public_key())
        names = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            requested = [
                *san.get_values_for_type(x509.DNSName),
                *map(str, san.get_values_for_type(x509.IPAddress)),
            ]
        except x509.ExtensionNotFound:
            requested = []
        if not names:
            raise PkiError("the request has no common name (CN): make it with -subj '/CN=NAME'")
        if kind == "server":
            sans = [check_host(n) for n in dict.fromkeys([*requested, names[0]])]
        else:
            check_identity(names[0])
            sans = [names[0]] if dns_ok(names[0]) else []
        cert = self._sign(public_key, names[0], sans=sans, kind=kind, days=days)
        return self._record(cert, names[0], kind, out, None)

    def renew(self, name: str, *, days: int = LEAF_DAYS) -> Issued:
        """A new certificate (new serial, new dates) for the same key, names and kind as the latest
        valid one issued to `name`, written over that certificate's file."""
        entry = self._latest_valid(name)
        path = Path(entry["cert"])
        try:
            old = x509.load_pem_x509_certificate(path.read_bytes())
        except FileNotFoundError as exc:
            raise PkiError(
                f"{path} (the certificate issued to {name!r}) is gone; issue a new one instead"
            ) from exc
        try:
            san = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            sans = [
                *san.get_values_for_type(x509.DNSName),
                *map(str, san.get_values_for_type(x509.IPAddress)),
            ]
        except x509.ExtensionNotFound:
            sans = []
        public_key = _usable_public_key(old.public_key())
        cert = self._sign(public_key, name, sans=sans, kind=entry["kind"], days=days)
        return self._record(cert, name, entry["kind"], path, None)

    def _latest_valid(self, name: str) -> dict[str, Any]:
        index = self._index()
        revoked = {r["serial"] for r in index["revoked"]}
        valid = [e for e in index["issued"] if e["name"] == name and e["serial"] not in revoked]
        if not valid:
            raise PkiError(f"no valid certificate was issued to {name!r} from {self.folder} (see `pki list`)")
        return dict(valid[-1])

    def revoke(self, name: str | None = None, *, serial: str | None = None, every: bool = False) -> list[str]:
        """Revoke one certificate (by serial, or the only valid one of `name`), or with `every`
        all of `name`'s; rewrite the CRL. Returns the serials revoked now."""
        index = self._index()
        known = {r["serial"] for r in index["revoked"]}
        valid = [e for e in index["issued"] if e["serial"] not in known]
        if serial is not None:
            wanted = serial.lower().removeprefix("0x").lstrip("0") or "0"
            chosen = [e for e in valid if e["serial"].lstrip("0") == wanted]
            if not chosen:
                raise PkiError(f"no valid certificate with serial {serial} in {self.folder} (see `pki list`)")
        else:
            chosen = [e for e in valid if e["name"] == name]
            if not chosen:
                raise PkiError(f"no valid certificate was issued to {name!r} from {self.folder}")
            if len(chosen) > 1 and not every:
                listing = ", ".join(f"{e['serial']} (until {e['not_after'][:10]})" for e in chosen)
                raise PkiError(
                    f"{name!r} has {len(chosen)} valid certificates: {listing}; revoke one with "
                    "--serial SERIAL, or all of them with --all"
                )
        now = _now().isoformat()
        for e in chosen:
            index["revoked"].append({"name": e["name"], "serial": e["serial"], "revoked_at": now})
        self._save_index(index)
        self.write_crl()
        return [e["serial"] for e in chosen]

    def write_crl(self, *, days: int = CRL_DAYS, out: Path | None = None) -> Path:
        """Sign a CRL valid for `days`, with a CRL number one above any before (RFC 5280 §5.2.3)."""
        if not 1 <= days <= 366:
            raise PkiError(f"--days {days}: a CRL must be valid for 1 to 366 days")
        target = out or self.crl_path
        ca_cert, ca_key = self._ca()
        index = self._index()
        number = max(int(index.get("crl_number", 0)), _crl_number(target), _crl_number(self.crl_path)) + 1
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca_cert.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + dt.timedelta(days=days))
            .add_extension(x509.CRLNumber(number), critical=False)
            # RFC 5280 §5.2.1: conforming CRL issuers MUST include the authority key identifier.
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
            )
        )
        for entry in index["revoked"]:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(entry["serial"], 16))
                .revocation_date(dt.datetime.fromisoformat(entry["revoked_at"]))
                .build()
            )
        crl = builder.sign(ca_key, hashes.SHA256())
        write_file(target, _pem(crl), private=False)
        index["crl_number"] = number
        self._save_index(index)
        return target

    def listing(self) -> list[dict[str, Any]]:
        index = self._index()
        revoked = {r["serial"] for r in index["revoked"]}
        return [{**e, "revoked": e["serial"] in revoked} for e in index["issued"]]


def _crl_number(path: Path) -> int:
    """The CRL Number of the CRL at `path`, 0 when there is none (no file, or an old CRL)."""
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except (OSError, ValueError, x509.ExtensionNotFound):
        return 0


def _usable_public_key(key: object) -> PublicKey:
    """EC P-256/P-384 or RSA of 2048 bits or more (what TLS 1.3 and VERIFY_X509_STRICT take)."""
    if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in ("secp256r1", "secp384r1"):
        return key
    if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
        return key
    raise PkiError("the key must be EC P-256/P-384 or RSA of 2048 bits or more")
