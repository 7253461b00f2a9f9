"""The ``elemta`` command line: serve, check-config, plugins, queue, plugin commands.

``main.py`` holds the top-level commands, ``queue*.py`` the ``queue`` group,
``context.py`` what they share (``--config``, the settings), ``output.py`` how
spool data is printed.
"""

from .context import current_settings, plugin_settings
from .main import main, run

__all__ = ["current_settings", "main", "plugin_settings", "run"]
