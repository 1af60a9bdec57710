"""The signing-tool invocations and the sample program the demo, e2e tests and bench sign."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from bridge_admin.signing_tools import (
    OPENSC_PKCS11,
    certificate_table,
    minimal_pe,
    osslsigncode_sign_command,
)


def test_osslsigncode_command_never_names_the_engine_path() -> None:
    # Debian 12's osslsigncode 2.5 fails with -pkcs11engine ("bad engine id"); hosts with 2.9
    # would not notice it coming back, so this guards the command line itself.
    cmd = osslsigncode_sign_command("pkcs11:id=%01", Path("c.pem"), Path("in.exe"), Path("out.exe"))
    assert "-pkcs11engine" not in cmd
    assert cmd[cmd.index("-pkcs11module") + 1] == str(OPENSC_PKCS11)


@pytest.mark.parametrize("payload", [b"\xc3", b"\xc3 marker", bytes(0x200), bytes(0x201)])
def test_minimal_pe_is_an_unsigned_pe32_plus_image_holding_the_payload(payload: bytes) -> None:
    pe = minimal_pe(payload)
    assert pe[:2] == b"MZ"
    (lfanew,) = struct.unpack_from("<I", pe, 0x3C)
    assert pe[lfanew : lfanew + 4] == b"PE\0\0"
    assert struct.unpack_from("<H", pe, lfanew + 24)[0] == 0x20B  # PE32+
    assert len(pe) % 0x200 == 0
    assert pe[0x200 : 0x200 + len(payload)] == payload  # .text's raw data follows the headers
    assert certificate_table(pe) == (0, 0)


def test_certificate_table_rejects_a_file_that_is_not_pe() -> None:
    with pytest.raises(ValueError, match="not a PE file"):
        certificate_table(bytes(0x100))
