"""Mutation testing of the safety-critical modules (`make mutation`, docs/testing.md)."""
