"""A token's `server_pin` section (issue 16, docs/ops.md "The PIN stays on the token host").

```yaml
tokens:
  - name: codesign
    allow: [build-vm-01, build-vm-02, release-vm]
    server_pin:
      credential: codesign-pin        # $CREDENTIALS_DIRECTORY/codesign-pin (LoadCredentialEncrypted=)
      # file: /etc/tokenbridge/codesign.pin   # or a file: tokenbridge-owned, mode 0600
      for: [build-vm-01, build-vm-02] # these sign with the server-held PIN (placeholder 000000)
      # references: [0x80]            # the VERIFY P2 the PIN is for (PIV: 80, the default)
```

`parse_server_pin` is pure (the YAML mapping to `ServerPinConfig`); `load_server_pin` reads the
PIN itself (`server_pin_source`) into the config's `pin`, which never prints and is not compared
(a reload always re-reads it). The PIN is never in the YAML: there is no key for it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

from bridge_server.guard.server_pin import DEFAULT_PIV_REFERENCES, ServerPin
from bridge_server.guard.server_pin_source import ServerPinError, read_server_pin, valid_credential_name
from protocol.errors import ConfigError
from protocol.runtime.schema import Section

KEYS: Final = ("credential", "file", "for", "references")


@dataclass(frozen=True, slots=True)
class ServerPinConfig:
    """Where a token's PIN is, who uses it, for which references; `pin` once loaded."""

    credential: str | None = None
    file: Path | None = None
    identities: tuple[str, ...] = ()  # YAML `for`
    references: frozenset[int] = DEFAULT_PIV_REFERENCES
    pin: ServerPin | None = field(default=None, compare=False, repr=False)
    problem: str = field(default="", compare=False)  # why `pin` is None after loading

    @property
    def source(self) -> str:
        return f"credential {self.credential}" if self.credential is not None else f"file {self.file}"


def server_pin_section(token: Section) -> Section:
    """The token's `server_pin` mapping; a `pin:` key in it gets its own error (it never goes there)."""
    raw = token.raw.get("server_pin")
    if isinstance(raw, dict) and any(k in raw for k in ("pin", "value", "password")):
        raise ConfigError(
            token.path, token.key("server_pin"),
            "the PIN is never written in the YAML; put it in a systemd credential or a 0600 file "
            "with `tokenbridge pin set` and name it with credential: or file: (docs/ops.md)",
        )  # fmt: skip
    return token.section("server_pin", KEYS)


def parse_server_pin(sec: Section, *, allow: tuple[str, ...], family: str) -> ServerPinConfig:
    """The `server_pin` mapping of one token (`allow` and `family` are the token's)."""
    credential, file = sec.string("credential"), sec.file("file")
    if (credential is None) == (file is None):
        raise ConfigError(sec.path, sec.prefix, "needs exactly one of credential: NAME or file: PATH")
    if credential is not None and not valid_credential_name(credential):
        raise sec.error("credential", f"{credential!r} is not a credential name (a file name, no '/')")
    identities = sec.names("for")
    if not identities:
        raise sec.error("for", "required: the identities that sign with the server-held PIN")
    for i, name in enumerate(identities):
        if name not in allow:
            close = difflib.get_close_matches(name, allow, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; add it to the token's allow list"
            raise sec.error(f"for[{i}]", f"{name!r} is not in the token's allow list{hint}")
    return ServerPinConfig(
        credential=credential, file=file, identities=identities, references=_references(sec, family)
    )


def _references(sec: Section, family: str) -> frozenset[int]:
    raw = sec.raw.get("references")
    if raw is None:
        if family in ("piv", "yubikey"):
            return DEFAULT_PIV_REFERENCES
        raise sec.error(
            "references",
            f"required for card family {family!r}: the PIN reference(s) (VERIFY P2) your card's "
            "middleware logs in with, e.g. [0x01]; see docs/ops.md",
        )
    if not isinstance(raw, list) or not raw:
        raise sec.error("references", f"expected a list of reference bytes such as [0x80], got {raw!r}")
    refs = set()
    for i, value in enumerate(raw):
        ref = _byte(value)
        if ref is None:
            raise sec.error(f"references[{i}]", f"expected a reference byte 0x00..0xFF, got {value!r}")
        refs.add(ref)
    return frozenset(refs)


def _byte(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= 0xFF else None
    if isinstance(value, str):
        try:
            number = int(value, 16)
        except ValueError:
            return None
        return number if 0 <= number <= 0xFF else None
    return None


def load_server_pin(config: ServerPinConfig, path: Path, key: str) -> ServerPinConfig:
    """`config` with its PIN read (or `problem` saying why there is none yet).

    Raises ConfigError (file `path`, dotted `key`) for a PIN that is there but must not be used.
    """
    try:
        pin, problem = read_server_pin(credential=config.credential, file=config.file)
    except ServerPinError as exc:
        source = "credential" if config.credential is not None else "file"
        raise ConfigError(str(path), f"{key}.{source}", str(exc)) from None
    return replace(config, pin=pin, problem=problem or "")
