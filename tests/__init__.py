"""Test suite of convstate (a package so that ``from tests.servers import ...`` works)."""
