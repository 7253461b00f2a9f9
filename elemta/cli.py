"""The ``elemta`` command line."""

from __future__ import annotations

import click


@click.group()
@click.version_option(package_name="elemta")
def main() -> None:
    """Elemta: a plugin-driven mail filter pipeline server."""
