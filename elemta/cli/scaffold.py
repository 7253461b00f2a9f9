"""``elemta plugin new NAME``: a plugin package in the shape of the ones Elemta ships.

The package it writes installs on its own, declares its entry point and its
``[plugins.NAME]`` table, keeps its hooks in ``__init__.py`` and its logic in
plain modules, has a README of the house shape and tests that pass as they are
(``pip install -e '.[test]' && pytest``). The example plugin adds a header to
every message and can refuse messages by subject, so the tests show the two
things a plugin test most often checks: a refusal at the SMTP dialogue and
what the delivered message looks like.
"""

from __future__ import annotations

import re
from pathlib import Path
from string import Template

import click

from .context import fail

NAME = re.compile(r"[a-z][a-z0-9_]{0,39}\Z")

PYPROJECT = '''[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "$dist"
version = "0.1.0"
description = "An Elemta plugin: $name"
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["elemta>=$elemta_version"]

[project.optional-dependencies]
test = ["elemta[test]"]

[project.entry-points.elemta]
$name = "$package:$cls"

[tool.setuptools.packages.find]
include = ["$package*"]

[tool.pytest.ini_options]
testpaths = ["tests"]
asyncio_mode = "auto"
asyncio_default_fixture_loop_scope = "function"
'''

INIT = '''"""$dist: the hook implementations; the rules are in :mod:`$package.rules`.

Enabled as ``$name`` (``[plugins] enabled = ["$name"]``); Elemta makes one
:class:`$cls` per server, so two servers in one process never share state.
"""

from __future__ import annotations

from elemta import App, Message, Reject, hookimpl

from .rules import refusal_for
from .settings import ${cls}Settings

__all__ = ["$cls", "${cls}Settings"]


class $cls:
    """The ``$name`` plugin: ``register_config``, ``startup`` and ``data``."""

    def __init__(self) -> None:
        self.settings = ${cls}Settings()

    @hookimpl
    def register_config(self) -> dict[str, type[${cls}Settings]]:
        return {"$name": ${cls}Settings}

    @hookimpl
    def startup(self, app: App) -> None:
        self.settings = app.plugin_settings("$name")

    @hookimpl
    def data(self, message: Message) -> Reject | None:
        """Refuse a message whose subject is refused; otherwise add the header and go on."""
        why = refusal_for(message.header("Subject") or "", self.settings.refused_subjects)
        if why is not None:
            return Reject(550, "5.7.1", why)
        message.add_header(self.settings.header_name, self.settings.header_value)
        return None
'''

SETTINGS = '''"""The ``[plugins.$name]`` table."""

from __future__ import annotations

import pydantic


class ${cls}Settings(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    header_name: str = "X-$header"
    header_value: str = "seen"
    refused_subjects: tuple[str, ...] = ()
'''

RULES = '''"""The plugin's logic, as plain functions: tested without a server."""

from __future__ import annotations

from collections.abc import Iterable


def refusal_for(subject: str, refused: Iterable[str]) -> str | None:
    """Why a message with ``subject`` is refused, or ``None``: a case-insensitive match."""
    lowered = subject.lower()
    for words in refused:
        if words.lower() in lowered:
            return f"Message refused: subject contains {words!r}"
    return None
'''

TEST = '''"""$dist against a real Elemta server on loopback (the elemta_server fixture)."""

from __future__ import annotations

from elemta.testing import send_mail

from $package.rules import refusal_for

MESSAGE = "Subject: $subject\\nFrom: a@example.org\\n\\nHello.\\n"


def test_refusal_is_case_insensitive():
    assert refusal_for("WIN a Prize", ["win a prize"]) is not None
    assert refusal_for("hello", ["win a prize"]) is None


async def test_the_delivered_message_carries_the_header(elemta_server, elemta_outbox):
    server = await elemta_server(enabled=["$name"], outbox=elemta_outbox)

    sent = await send_mail(server, "a@example.org", ["user@example.test"], MESSAGE)

    assert sent.accepted, sent.reply
    [delivered] = await elemta_outbox.wait(1)
    assert delivered.recipients == ["user@example.test"]
    assert delivered.header("X-$header") == "seen"


async def test_a_refused_subject_is_refused_at_the_end_of_data(elemta_server):
    server = await elemta_server(
        enabled=["$name"], config={"plugins": {"$name": {"refused_subjects": ["$subject"]}}})

    sent = await send_mail(server, "a@example.org", ["user@example.test"], MESSAGE)

    assert sent.reply.code == 550
    assert "subject contains" in sent.reply.text
'''

README = '''# $dist

An Elemta plugin that adds a header to every message it lets through and refuses messages
whose subject contains one of the configured phrases. Replace this with what your plugin
does: which hooks it answers, and what an operator sees.

## Safe default

Enabled with no `[plugins.$name]` table, it adds `X-$header: seen` to every message and
refuses nothing.

## Configuration

| key | type | default | meaning |
|-----|------|---------|---------|
| `header_name` | string | `"X-$header"` | The header field added to every message that is accepted. |
| `header_value` | string | `"seen"` | Its value. |
| `refused_subjects` | list of strings | `[]` | A message whose `Subject:` contains one of these (case-insensitive) gets `550 5.7.1` at the end of DATA. |

```toml
[plugins]
enabled = ["$name"]

[plugins.$name]
refused_subjects = ["win a prize"]
```

## Hooks used

- `register_config`: declares the `[plugins.$name]` table (`${cls}Settings`).
- `startup`: reads the settings.
- `data`: refuses a message by subject, or adds the header and lets the later plugins decide.

## Things to know

- Develop with `pip install -e '.[test]'`, then `pytest`: the tests start a real Elemta
  server on loopback ports with the plugin enabled.
'''


def names_for(name: str) -> dict[str, str]:
    cls = "".join(part.capitalize() for part in name.split("_")) + "Plugin"
    return {
        "name": name,
        "dist": "elemta-" + name.replace("_", "-"),
        "package": "elemta_" + name,
        "cls": cls,
        "header": "".join(part.capitalize() for part in name.split("_")),
        "subject": "win a prize",
    }


def write_package(name: str, directory: Path, elemta_version: str) -> Path:
    """Write the package for plugin ``name`` into ``directory/elemta-NAME``; its path.

    Raises ``ValueError`` for a name that cannot be a plugin name, ``FileExistsError``
    when the folder exists.
    """
    if not NAME.match(name):
        raise ValueError(f"{name!r} is not a plugin name: use lower-case letters, digits and "
                         "'_', starting with a letter (for example greylist or spam_score)")
    values = names_for(name) | {"elemta_version": elemta_version}
    root = directory / values["dist"]
    if root.exists():
        raise FileExistsError(f"{root} exists already: choose another name, or remove it")
    package, tests = root / values["package"], root / "tests"
    files = {
        root / "pyproject.toml": PYPROJECT,
        root / "README.md": README,
        package / "__init__.py": INIT,
        package / "settings.py": SETTINGS,
        package / "rules.py": RULES,
        tests / f"test_{name}.py": TEST,
    }
    for path, template in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(template).substitute(values))
    return root


@click.group("plugin")
def plugin_group() -> None:
    """Develop plugins."""


@plugin_group.command("new")
@click.argument("name")
@click.option("--directory", type=click.Path(file_okay=False, path_type=Path), default=Path("."),
              show_default=True, help="Where the package folder is created.")
def new(name: str, directory: Path) -> None:
    """Create a plugin package elemta-NAME: entry point, settings, README, passing tests."""
    from .. import __version__

    try:
        root = write_package(name, directory, __version__)
    except (ValueError, FileExistsError) as e:
        fail(str(e))
    except OSError as e:
        fail(f"cannot write the package under {directory}: {e.strerror or e}")
    click.echo(f"created {root}\n\nnext:\n  cd {root}\n  pip install -e '.[test]'\n  pytest")
