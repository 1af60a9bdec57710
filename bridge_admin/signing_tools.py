"""How the demo, the tests and the bench call the real signing tools, and what they sign.

osslsigncode differs between the releases a user may have (DESIGN §11), and the one command
line here is the one that works on all of them:

- Debian 12 ships 2.5. Given `-pkcs11engine PATH` it asks OpenSSL's `dynamic` engine to load
  libp11's engine from that path and fails ("dynamic_load:init failed ... bad engine id");
  without the option it loads the engine by its id, `pkcs11`, which libengine-pkcs11-openssl
  registers in OpenSSL's engines directory. Newer releases (2.9 in bookworm-backports) load it
  the same way when the option is absent, so the option is simply never passed.
- 2.5 signs PE, CAB and MSI files only ("Unrecognized file type" for a PowerShell script), so
  what gets signed is a small but well-formed Windows executable built by `minimal_pe`.
"""

from __future__ import annotations

import platform
import re
import struct
import subprocess
from pathlib import Path
from typing import Final

from bridge_admin.local_stack import PIN, DemoError, reader_name, run


def _multiarch() -> str:
    machine = platform.machine()
    return {
        "x86_64": "x86_64-linux-gnu",
        "aarch64": "aarch64-linux-gnu",
        "armv7l": "arm-linux-gnueabihf",
    }.get(machine, f"{machine}-linux-gnu")


OPENSC_PKCS11: Final = Path(f"/usr/lib/{_multiarch()}/opensc-pkcs11.so")
# libp11's engine; osslsigncode finds it by id, this path is only checked to exist (demo preflight).
PKCS11_ENGINE: Final = Path(f"/usr/lib/{_multiarch()}/engines-3/pkcs11.so")

# PE/COFF layout (Microsoft "PE Format"): a 64-byte MS-DOS header whose e_lfanew (offset 0x3C)
# points at the "PE\0\0" signature, the 20-byte COFF file header, the PE32+ optional header
# (112 bytes of fields + 16 data directories of 8 bytes = 240) and one 40-byte section header.
_FILE_ALIGNMENT: Final = 0x200
_SECTION_ALIGNMENT: Final = 0x1000
_PE_OFFSET: Final = 0x40
_IMAGE_FILE_MACHINE_AMD64: Final = 0x8664
_IMAGE_FILE_EXECUTABLE_IMAGE_LARGE_ADDRESS_AWARE: Final = 0x0022
_PE32_PLUS_MAGIC: Final = 0x20B
_IMAGE_SUBSYSTEM_WINDOWS_CUI: Final = 3
_DLL_CHARACTERISTICS: Final = 0x8160  # TS-aware, NX-compatible, dynamic base, high-entropy VA
_SECTION_CODE_EXECUTE_READ: Final = 0x60000020
_DATA_DIRECTORIES: Final = 16  # the certificate table osslsigncode fills is entry 4


def minimal_pe(payload: bytes = b"\xc3") -> bytes:
    """A well-formed PE32+ console executable whose one `.text` section holds `payload`.

    It is never run; it exists so Authenticode tools have a real PE file to sign and verify.
    The default payload is a single `ret`; callers may put a marker in it to tell files apart.
    """
    raw_size = -(-max(len(payload), 1) // _FILE_ALIGNMENT) * _FILE_ALIGNMENT
    dos = bytearray(_PE_OFFSET)
    dos[0:2] = b"MZ"
    struct.pack_into("<I", dos, 0x3C, _PE_OFFSET)
    coff = struct.pack(
        "<HHIIIHH",
        _IMAGE_FILE_MACHINE_AMD64,
        1,  # NumberOfSections
        0,  # TimeDateStamp: reproducible output
        0,
        0,  # no COFF symbol table in an image
        112 + 8 * _DATA_DIRECTORIES,  # SizeOfOptionalHeader
        _IMAGE_FILE_EXECUTABLE_IMAGE_LARGE_ADDRESS_AWARE,
    )
    optional = struct.pack(
        "<HBBIIIIIQIIHHHHHHIIIIHHQQQQII",
        _PE32_PLUS_MAGIC,
        14,
        0,  # linker version
        raw_size,  # SizeOfCode
        0,
        0,
        _SECTION_ALIGNMENT,  # AddressOfEntryPoint: start of .text
        _SECTION_ALIGNMENT,  # BaseOfCode
        0x140000000,  # ImageBase, the usual one for 64-bit executables
        _SECTION_ALIGNMENT,
        _FILE_ALIGNMENT,
        6,
        0,  # operating system version
        0,
        0,  # image version
        6,
        0,  # subsystem version
        0,  # Win32VersionValue
        _SECTION_ALIGNMENT + -(-raw_size // _SECTION_ALIGNMENT) * _SECTION_ALIGNMENT,  # SizeOfImage
        _FILE_ALIGNMENT,  # SizeOfHeaders
        0,  # CheckSum: signing tools compute it
        _IMAGE_SUBSYSTEM_WINDOWS_CUI,
        _DLL_CHARACTERISTICS,
        0x100000,
        0x1000,
        0x100000,
        0x1000,  # stack and heap reserve/commit
        0,  # LoaderFlags
        _DATA_DIRECTORIES,
    ) + bytes(8 * _DATA_DIRECTORIES)
    section = struct.pack(
        "<8sIIIIIIHHI",
        b".text",
        len(payload),  # VirtualSize
        _SECTION_ALIGNMENT,  # VirtualAddress
        raw_size,
        _FILE_ALIGNMENT,  # PointerToRawData: right after the headers
        0,
        0,
        0,
        0,
        _SECTION_CODE_EXECUTE_READ,
    )
    headers = bytes(dos) + b"PE\0\0" + coff + optional + section
    assert len(headers) <= _FILE_ALIGNMENT
    return headers.ljust(_FILE_ALIGNMENT, b"\0") + payload.ljust(raw_size, b"\0")


def osslsigncode_sign_command(key_uri: str, cert: Path, infile: Path, outfile: Path) -> list[str]:
    """The `osslsigncode sign` command line that works with Debian 12's 2.5 and with 2.9.

    No `-pkcs11engine`: see the module docstring. The key is a PKCS#11 URI (RFC 7512).
    """
    return [
        "osslsigncode",
        "sign",
        "-pkcs11module",
        str(OPENSC_PKCS11),
        "-key",
        key_uri,
        "-certs",
        str(cert),
        "-h",
        "sha256",
        "-in",
        str(infile),
        "-out",
        str(outfile),
    ]


def osslsigncode_verify_command(cert: Path, signed: Path) -> list[str]:
    return ["osslsigncode", "verify", "-CAfile", str(cert), "-in", str(signed)]


def certificate_table(pe: bytes) -> tuple[int, int]:
    """The (file offset, size) of a PE file's certificate table (data directory 4): (0, 0) if unsigned."""
    (pe_offset,) = struct.unpack_from("<I", pe, 0x3C)
    if pe[pe_offset : pe_offset + 4] != b"PE\0\0":
        raise ValueError("not a PE file: no PE signature where e_lfanew points")
    optional = pe_offset + 24
    (magic,) = struct.unpack_from("<H", pe, optional)
    directories = optional + (112 if magic == _PE32_PLUS_MAGIC else 96)
    offset, size = struct.unpack_from("<II", pe, directories + 4 * 8)
    return offset, size


# -- running them against a card in a vpcd reader (the demo, the end-to-end tests, the bench) ---


def pkcs11(
    *args: str, slot: int, timeout: float = 120.0, check: bool = True
) -> subprocess.CompletedProcess[str]:
    cmd = ["pkcs11-tool", "--module", str(OPENSC_PKCS11), "--slot-description", reader_name(slot), *args]
    return run(cmd, timeout=timeout, check=check)


def pkcs11_sign(
    slot: int,
    infile: Path,
    outfile: Path,
    *,
    key_id: str = "01",
    pin: str = PIN,
    timeout: float = 120.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """`pkcs11-tool --login --sign` (RSA PKCS#1 v1.5 over SHA-256) with key `key_id` in reader `slot`."""
    return pkcs11(
        "--login", "--pin", pin, "--sign", "--id", key_id, "-m", "SHA256-RSA-PKCS",
        "--input-file", str(infile), "--output-file", str(outfile), slot=slot, timeout=timeout, check=check,
    )  # fmt: skip


def token_serial(slot: int) -> str:
    out = pkcs11("-L", slot=slot).stdout
    m = re.search(r"serial num\s*:\s*(\S+)", out)
    if not m:
        raise DemoError(f"pkcs11-tool -L shows no token serial in {reader_name(slot)}:\n{out}")
    return m.group(1)


def read_certificate_pem(slot: int, key_id: str, out: Path) -> Path:
    der = out.with_suffix(".der")
    pkcs11("--read-object", "--type", "cert", "--id", key_id, "--output-file", str(der), slot=slot)
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    out.write_bytes(x509.load_der_x509_certificate(der.read_bytes()).public_bytes(Encoding.PEM))
    return out


def osslsigncode_sign(
    slot: int, cert: Path, infile: Path, outfile: Path, *, key_id: str = "01", pin: str = PIN
) -> subprocess.CompletedProcess[str]:
    serial = token_serial(slot)
    key_uri = f"pkcs11:serial={serial};id=%{key_id};type=private;pin-value={pin}"
    outfile.unlink(missing_ok=True)
    return run(osslsigncode_sign_command(key_uri, cert, infile, outfile))


def osslsigncode_verify(cert: Path, signed: Path) -> subprocess.CompletedProcess[str]:
    return run(osslsigncode_verify_command(cert, signed))
