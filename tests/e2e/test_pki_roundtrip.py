"""Full PKI round trip: init, server and two clients connect; revoking one drops it within 5 s."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from admin_stack import admin_stack, cli, expect, wire_client

from protocol import wire


async def test_revoked_client_is_dropped_and_kept_out_while_the_other_stays(tmp_path: Path) -> None:
    with admin_stack(tmp_path, ["build-vm-01", "build-vm-02"], ["build-vm-01", "build-vm-02"]) as stack:
        with trio.fail_after(60):
            async with wire_client(stack, "build-vm-01") as vm1, wire_client(stack, "build-vm-02") as vm2:
                code, out = await cli("pki", "--dir", str(stack.pki.folder), "revoke", "build-vm-01")
                assert code == 0, out
                start = trio.current_time()
                with trio.fail_after(5):
                    try:
                        while not isinstance(await vm1.receive(), wire.Goodbye | wire.ConnectionClosed):
                            pass
                    except trio.BrokenResourceError:
                        pass
                dropped_s = trio.current_time() - start
                await vm2.send(wire.Ping(nonce=7))
                assert (await expect(vm2, wire.Pong)).nonce == 7
            with pytest.raises(trio.BrokenResourceError):
                async with wire_client(stack, "build-vm-01"):
                    pass
            async with wire_client(stack, "build-vm-02") as again:
                await again.send(wire.LeaseRequest(token_id=0))
                await expect(again, wire.LeaseGranted)
    assert dropped_s < 5
    assert "session.revoked" in stack.server.log_text() if stack.server else False
