"""elemta-datasource: hosted domains, mailboxes, aliases and routing rules.

Enable it with ``[plugins] enabled = ["datasource"]``; see README.md.
"""

from .directory import Domain, Lookup, Rule
from .backends import make_backend
from .plugin import DatasourcePlugin
from .settings import DatasourceSettings

__all__ = ["DatasourcePlugin", "DatasourceSettings", "Domain", "Lookup", "Rule", "make_backend"]
