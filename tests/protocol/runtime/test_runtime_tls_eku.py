"""Each end requires the other's certificate to carry its role's extended key usage (issue 13 item 11).

OpenSSL refuses a certificate whose EKU lacks the purpose (a serverAuth-only client), but takes
one with no EKU at all, and one with both clientAuth and serverAuth, in either role. The bridge
checks the peer certificate after the handshake: a client needs clientAuth, the server
serverAuth, and a certificate naming both roles is refused in each (`tokenbridge pki` issues one
role per certificate; docs/guardrails.md says why).
"""

from __future__ import annotations

import pytest
import trio
import trio.testing
from runtime_tls_helpers import CertFiles, Pki

from protocol.errors import TlsSetupError
from protocol.runtime.tls import check_peer_purpose, client_context, peer_identity, server_context


async def _connect(
    pki: Pki, server: CertFiles, client: CertFiles
) -> tuple[trio.SSLStream[trio.abc.Stream], trio.SSLStream[trio.abc.Stream]]:
    """Both ends handshaken (OpenSSL accepted the chain); the streams stay open."""
    server_raw, client_raw = trio.testing.memory_stream_pair()
    srv = trio.SSLStream(
        server_raw, server_context(ca=pki.ca_file, cert=server.cert, key=server.key), server_side=True
    )
    cli = trio.SSLStream(
        client_raw,
        client_context(ca=pki.ca_file, cert=client.cert, key=client.key),
        server_hostname="bridge.example",
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(cli.do_handshake)
        await srv.do_handshake()
    return srv, cli


@pytest.mark.parametrize(("role", "problem"), [("none", "no extended key usage"), ("both", "both")])
async def test_the_server_refuses_a_client_certificate_without_clientauth_only(
    pki: Pki, role: str, problem: str
) -> None:
    client = pki.issue(f"client-{role}", "vm9.ci.example", common_name="vm9", role=role)  # type: ignore[arg-type]
    srv, _ = await _connect(pki, pki.server, client)
    with pytest.raises(TlsSetupError, match=problem) as info:
        peer_identity(srv)
    assert "clientAuth" in str(info.value)
    assert "vm9" in str(info.value)


@pytest.mark.parametrize(("role", "problem"), [("none", "no extended key usage"), ("both", "both")])
async def test_the_client_refuses_a_server_certificate_without_serverauth_only(
    pki: Pki, role: str, problem: str
) -> None:
    server = pki.issue(f"server-{role}", "bridge.example", common_name="bridge-server", role=role)  # type: ignore[arg-type]
    _, cli = await _connect(pki, server, pki.client)
    with pytest.raises(TlsSetupError, match=problem) as info:
        check_peer_purpose(cli)
    assert "serverAuth" in str(info.value)


async def test_single_role_certificates_pass_on_both_ends(pki: Pki) -> None:
    srv, cli = await _connect(pki, pki.server, pki.client)
    assert peer_identity(srv).name == "builder-07"
    check_peer_purpose(cli)
    check_peer_purpose(srv)
