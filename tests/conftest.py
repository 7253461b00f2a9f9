"""Shared helpers for the core tests.

``require_tool``, ``start_server``, ``elemta_server`` and ``dns_server`` come
from ``elemta.testing`` (the pytest11 plugin), as they do for plugin tests.
"""
