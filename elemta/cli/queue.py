"""``elemta queue``: look into the spool and manage its messages, with or without a server.

``list``, ``show`` and ``stats`` only read the files (``queue_read.py``);
``hold``, ``release``, ``retry``, ``delete`` and ``bounce`` change the spool
(``queue_change.py``).
"""

from __future__ import annotations

import click

from . import queue_change, queue_read
from .context import config_option


@click.group("queue")
@config_option
def queue_group() -> None:
    """Inspect and manage the messages in the spool."""


for command in (queue_read.list_messages, queue_read.show_message, queue_read.stats,
                queue_change.hold, queue_change.release, queue_change.retry, queue_change.delete,
                queue_change.bounce):
    queue_group.add_command(command)
