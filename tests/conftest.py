"""Loads the shared fixtures, helpers and hooks of tests/support.py (see its docstring) for
every test, and pytester for the tests of that machinery."""

pytest_plugins = ("support", "pytester")
