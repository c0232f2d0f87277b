"""Shared test helpers, imported as a package (``from helpers.models import SCHEMA``) from any test folder.

``tests/`` is on ``sys.path`` because ``tests/conftest.py`` is a rootdir conftest outside any package; each
module here is plain Python (no fixtures), so a test file imports what it uses by name.
"""
