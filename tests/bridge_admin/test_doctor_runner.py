"""Issue 19 #7: `tokenbridge doctor` for a CI runner's user, who cannot read the client's key.

The key is the service's systemd credential (root only). Such a user asks the running client
(its status socket) instead; when it cannot reach that either, the failure says which group
to join. The positive path, with a real client as its service user, is in tests/e2e/test_docs_walk.py.
"""

from __future__ import annotations

from pathlib import Path

from bridge_admin.doctor import checks_via_service


def test_without_the_key_or_the_status_socket_doctor_says_which_group_to_join(tmp_path: Path) -> None:
    checks = checks_via_service(tmp_path / "client.sock", [])
    assert [(c.name, c.status) for c in checks] == [("server", "fail")]
    assert "neither the client key nor the client's status socket" in checks[0].detail
    assert "usermod -aG tokenbridge USER" in checks[0].fix
