"""pytest fixtures for Elemta and its plugins (the ``pytest11`` entry point)."""
