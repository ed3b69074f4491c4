"""Helpers shared by the Python test suites (tests/compat, tests/integration)."""
