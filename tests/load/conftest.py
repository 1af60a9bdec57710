"""Load tests: helpers come from tests/support and tests/bridge_server (pyproject pythonpath)."""
