"""Fixtures every test module may use: `server`, `rpc` and `client` of a default
in-process server (tests/service_fixtures.py); a module defining its own overrides them."""

from service_fixtures import client, rpc, server  # noqa: F401  (pytest fixtures)
