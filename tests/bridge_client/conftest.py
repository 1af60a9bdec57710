"""Fixtures for the client tests (helpers live in client_fakes.py)."""

from __future__ import annotations

import pytest
from client_fakes import Certs


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return Certs.create(tmp_path_factory.mktemp("client-pki"))
