"""elemta.toml → typed, frozen, validated settings.

Every mistake stops start-up with the file, the key, what is wrong and how to
fix it (``ConfigError``). Secrets may be given as ``{ env = "NAME" }`` or
``{ file = "path" }`` wherever a key is documented as a secret.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import pydantic
import tomlkit
import tomlkit.exceptions
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .config_errors import format_validation_error, suggest

DEFAULT_CONFIG = "elemta.toml"


class ConfigError(Exception):
    """A configuration mistake; ``str()`` is the message to show the operator."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


def _resolve_secret(value: Any, info: pydantic.ValidationInfo) -> Any:
    if isinstance(value, Mapping):
        keys = set(value)
        if keys == {"env"}:
            name = value["env"]
            if name not in os.environ:
                raise ValueError(f"environment variable {name} is not set "
                                 f"(export it or use {{ file = \"path\" }})")
            return os.environ[name]
        if keys == {"file"}:
            base = (info.context or {}).get("base_dir", Path("."))
            path = Path(base, value["file"])
            try:
                return path.read_text().rstrip("\r\n")
            except OSError as e:
                raise ValueError(f"cannot read secret file {path}: {e.strerror}") from None
        raise ValueError('a secret is a string, { env = "NAME" } or { file = "path" }')
    return value


Secret = Annotated[pydantic.SecretStr, pydantic.BeforeValidator(_resolve_secret)]
"""A string that may come from the environment or a file and never prints."""


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_hostport(value: str, what: str = "address") -> tuple[str, int]:
    """``"127.0.0.1:25"`` / ``"[::1]:25"`` → (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f'{what} must be "host:port", got {value!r}')
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        raise ValueError(f'{what} must name a host ("0.0.0.0:25" for all), got {value!r}')
    p = int(port)
    if not 0 <= p <= 65535:
        raise ValueError(f"port must be 0..65535, got {p}")
    return host, p


class ServerSettings(_Settings):
    hostname: str = "localhost"
    state_dir: Path = Path(".elemta")
    max_message_bytes: int = Field(26_214_400, gt=0)
    max_recipients: int = Field(100, gt=0)
    max_connections: int = Field(1000, gt=0)
    max_connections_per_ip: int = Field(50, gt=0)
    max_bad_commands: int = Field(20, gt=0)
    max_auth_failures: int = Field(3, gt=0)
    command_timeout_seconds: float = Field(300.0, gt=0)
    data_timeout_seconds: float = Field(600.0, gt=0)
    shutdown_grace_seconds: float = Field(30.0, ge=0)
    tls_handshake_timeout_seconds: float = Field(30.0, gt=0)
    max_tls_handshakes: int = Field(100, gt=0)
    relay_networks: tuple[str, ...] = ()
    postmaster: str | None = None
    bare_newline: Literal["reject", "normalize"] = "reject"
    event_loop: Literal["asyncio", "uvloop"] = "asyncio"
    # started as root: bind, read the keys, then run as this user (and group)
    user: str | None = None
    group: str | None = None

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str) -> str:
        if not v or any(c.isspace() for c in v) or "/" in v:
            raise ValueError(f"hostname must be a DNS name such as mx.example.com, got {v!r}")
        return v

    @field_validator("postmaster")
    @classmethod
    def _postmaster(cls, v: str | None) -> str | None:
        if v is None:
            return v
        local, at, domain = v.rpartition("@")
        if not at or not local or not domain or any(c.isspace() or c in "<>" for c in v):
            raise ValueError(f"postmaster must be a mail address such as admin@example.com "
                             f"(someone who reads it), got {v!r}")
        return v

    @field_validator("relay_networks")
    @classmethod
    def _networks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not a network (write 192.0.2.0/24 or 2001:db8::/32)") from None
        return v


class ListenerSettings(_Settings):
    name: str
    address: str
    mode: Literal["smtp", "submission"] = "smtp"
    tls: Literal["none", "starttls", "implicit"] = "starttls"
    require_auth: bool | None = None
    require_tls: bool | None = None
    allow_plaintext_auth: bool = False
    add_missing_headers: bool | None = None
    received_hide_client: bool = False
    proxy_protocol: bool = False   # a load balancer's PROXY header comes first
    proxy_trusted: tuple[str, ...] = ()
    proxy_timeout_seconds: float = Field(5.0, gt=0, le=300)

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        parse_hostport(v)
        return v

    @field_validator("proxy_trusted")
    @classmethod
    def _proxy_trusted(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return ServerSettings._networks(v)

    @model_validator(mode="after")
    def _submission_defaults(self) -> "ListenerSettings":
        submission = self.mode == "submission"
        if self.require_auth is None:
            object.__setattr__(self, "require_auth", submission)
        if self.require_tls is None:
            object.__setattr__(self, "require_tls", submission and self.tls == "starttls")
        if self.add_missing_headers is None:
            object.__setattr__(self, "add_missing_headers", submission)
        if self.require_tls and self.tls == "none":
            raise ValueError("require_tls = true needs tls = \"starttls\" or \"implicit\"")
        if self.proxy_protocol and not self.proxy_trusted:
            raise ValueError("proxy_protocol = true needs proxy_trusted, the addresses of the "
                             'proxies allowed to connect: proxy_trusted = ["10.0.0.5/32"]')
        if self.proxy_trusted and not self.proxy_protocol:
            raise ValueError("proxy_trusted is set but proxy_protocol is false: set "
                             "proxy_protocol = true, or remove proxy_trusted")
        return self

    @property
    def host(self) -> str:
        return parse_hostport(self.address)[0]

    @property
    def port(self) -> int:
        return parse_hostport(self.address)[1]


class AuthSettings(_Settings):
    """``[auth]``: how failed logins are slowed down and locked out (per server process)."""

    window_seconds: float = Field(900.0, gt=0)
    slow_after_failures: int = Field(3, ge=1)
    max_delay_seconds: float = Field(8.0, ge=0)
    lock_after_failures: int = Field(10, ge=1)
    lock_seconds: float = Field(900.0, gt=0)
    user_lock_after_failures: int = Field(30, ge=1)

    @model_validator(mode="after")
    def _order(self) -> "AuthSettings":
        if self.lock_after_failures < self.slow_after_failures:
            raise ValueError(f"lock_after_failures ({self.lock_after_failures}) must not be "
                             f"below slow_after_failures ({self.slow_after_failures})")
        return self


class StateSettings(_Settings):
    """``[state]``: where policy plugins keep shared state (greylisting, rate limits)."""

    backend: Literal["embedded", "redis"] = "embedded"
    path: Path | None = None                 # embedded: default <state_dir>/state.sqlite3
    redis_url: Secret | None = None          # "redis://host:6379/0", "rediss://…" for TLS
    redis_password: Secret | None = None
    redis_ca_file: Path | None = None        # rediss://: verify the server against this CA
    key_prefix: str = Field("elemta:", max_length=64)
    timeout_seconds: float = Field(1.0, gt=0, le=60)

    @model_validator(mode="after")
    def _redis_needs_url(self) -> "StateSettings":
        if self.backend == "redis" and self.redis_url is None:
            raise ValueError('backend = "redis" needs redis_url (for example '
                             '"redis://127.0.0.1:6379/0", or { env = "ELEMTA_REDIS_URL" })')
        return self


class TLSSettings(_Settings):
    cert_file: Path | None = None
    key_file: Path | None = None
    min_version: Literal["1.2", "1.3"] = "1.2"
    ciphers: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> "TLSSettings":
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both cert_file and key_file, or neither "
                             "(neither: a self-signed certificate is generated)")
        return self


class SpoolSettings(_Settings):
    path: Path = Path("queue")
    commit_threads: int = Field(8, ge=1, le=64)
    memory_bytes: int = Field(262_144, ge=0)
    min_free_bytes: int = Field(52_428_800, ge=0)
    min_free_inodes: int = Field(1000, ge=0)


class MetricsSettings(_Settings):
    enabled: bool = True
    address: str = "127.0.0.1:9025"
    domains: tuple[str, ...] = Field((), max_length=1000)   # domain label values

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        parse_hostport(v)
        return v


class LogSettings(_Settings):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    # a file instead of stderr; SIGUSR1 reopens it (after logrotate moved it)
    file: Path | None = None


class DNSSettings(_Settings):
    nameservers: tuple[str, ...] = ()
    timeout_seconds: float = Field(5.0, gt=0)
    attempts: int = Field(2, ge=1, le=10)
    cache_max_entries: int = Field(10_000, ge=0)
    min_ttl_seconds: int = Field(0, ge=0)
    max_ttl_seconds: int = Field(86_400, ge=0)
    negative_ttl_seconds: int = Field(900, ge=0)

    @field_validator("nameservers")
    @classmethod
    def _nameservers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for ns in v:
            host, _ = parse_hostport(ns, "a nameserver")
            try:
                ipaddress.ip_address(host)
            except ValueError:
                # a nameserver given by name would need DNS to be found
                raise ValueError(f"a nameserver must be an IP address with a port, such as "
                                 f'"127.0.0.1:53" or "[::1]:53", got {ns!r}') from None
        return v

    @model_validator(mode="after")
    def _ttl_bounds(self) -> DNSSettings:
        if self.min_ttl_seconds > self.max_ttl_seconds:
            raise ValueError("min_ttl_seconds must not be larger than max_ttl_seconds")
        return self


OutboundTLS = Literal["none", "opportunistic", "required", "verify"]


class RouteSettings(_Settings):
    """A static route: deliver a domain's mail to this host instead of its MX."""

    host: str
    tls: OutboundTLS = "opportunistic"
    username: str | None = None
    password: Secret | None = None
    ca_file: Path | None = None

    @field_validator("host")
    @classmethod
    def _host(cls, v: str) -> str:
        parse_hostport(v, "host")
        return v

    @model_validator(mode="after")
    def _credentials(self) -> "RouteSettings":
        if (self.username is None) != (self.password is None):
            raise ValueError("set both username and password, or neither")
        if self.username is not None and self.tls == "none":
            raise ValueError('AUTH needs TLS: set tls = "required" or "verify" for a route '
                             "with credentials")
        return self


class DeliverySettings(_Settings):
    enabled: bool = True
    workers: int = Field(200, ge=1, le=1000)
    max_per_destination: int = Field(20, ge=1)
    helo_name: str | None = None
    port: int = Field(25, ge=1, le=65535)
    tls: OutboundTLS = "opportunistic"
    retry_intervals_seconds: tuple[float, ...] = (300, 900, 1800, 3600, 14400, 28800, 86400)
    bounce_after_seconds: float = Field(172_800, gt=0)
    delay_notice_after_seconds: float = Field(0, ge=0)
    connect_timeout_seconds: float = Field(30, gt=0)
    command_timeout_seconds: float = Field(300, gt=0)
    attempt_timeout_seconds: float = Field(3600, gt=0)
    idle_connection_seconds: float = Field(10, ge=0)
    chunking: bool = False
    transport_process: bool = True
    routes: dict[str, RouteSettings] = Field(default_factory=dict)
    mx_overrides: dict[str, str] = Field(default_factory=dict)

    @field_validator("retry_intervals_seconds")
    @classmethod
    def _intervals(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(i <= 0 for i in v):
            raise ValueError("give at least one retry interval, every one greater than 0")
        return v

    @field_validator("routes")
    @classmethod
    def _routes(cls, v: dict[str, RouteSettings]) -> dict[str, RouteSettings]:
        return {k.lower().rstrip("."): r for k, r in v.items()}

    @field_validator("mx_overrides")
    @classmethod
    def _overrides(cls, v: dict[str, str]) -> dict[str, str]:
        out = {}
        for name, target in v.items():
            host, _ = parse_hostport(target, f"mx_overrides[{name!r}]")
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"mx_overrides[{name!r}] must be an IP address with a port, "
                                 f'such as "127.0.0.1:2526", got {target!r}') from None
            out[name.lower().rstrip(".")] = target
        return out


class DomainSettings(_Settings):
    max_message_bytes: int | None = Field(None, gt=0)


class PluginsSettings(_Settings):
    enabled: tuple[str, ...] = ()
    timeout_seconds: float = Field(30.0, gt=0)
    timeouts: dict[str, Annotated[float, Field(gt=0)]] = Field(default_factory=dict)
    # [plugins.<name>] tables, validated later against each plugin's schema
    tables: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _split_tables(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            known = {"enabled", "timeout_seconds", "timeouts"}
            tables = {k: v for k, v in data.items() if k not in known and isinstance(v, Mapping)}
            rest = {k: v for k, v in data.items() if k not in tables}
            rest["tables"] = tables
            return rest
        return data

    @field_validator("enabled")
    @classmethod
    def _unique(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        dupes = sorted({n for n in v if v.count(n) > 1})
        if dupes:
            raise ValueError(f"plugin listed twice: {', '.join(dupes)}")
        return v

    def timeout_for(self, plugin: str) -> float:
        return self.timeouts.get(plugin, self.timeout_seconds)


class Settings(_Settings):
    server: ServerSettings = ServerSettings()
    listeners: tuple[ListenerSettings, ...] = ()
    tls: TLSSettings = TLSSettings()
    auth: AuthSettings = AuthSettings()
    spool: SpoolSettings = SpoolSettings()
    state: StateSettings = StateSettings()
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()
    dns: DNSSettings = DNSSettings()
    delivery: DeliverySettings = DeliverySettings()
    domains: dict[str, DomainSettings] = Field(default_factory=dict)
    plugins: PluginsSettings = PluginsSettings()
    # where the file was read from; relative paths are relative to its folder
    source: Path = Field(Path(DEFAULT_CONFIG), exclude=True)

    @field_validator("listeners")
    @classmethod
    def _listeners(cls, v: tuple[ListenerSettings, ...]) -> tuple[ListenerSettings, ...]:
        names = [lst.name for lst in v]
        for n in names:
            if names.count(n) > 1:
                raise ValueError(f"two listeners are called {n!r}; names must be unique")
        addrs = [parse_hostport(lst.address) for lst in v]
        for a in addrs:
            if a[1] and addrs.count(a) > 1:
                raise ValueError(f"two listeners use {a[0]}:{a[1]}")
        return v

    @field_validator("domains")
    @classmethod
    def _domains(cls, v: dict[str, DomainSettings]) -> dict[str, DomainSettings]:
        return {k.lower().rstrip("."): s for k, s in v.items()}

    def resolve(self, path: Path) -> Path:
        """A configured path, made absolute: a relative one is relative to the config
        file's folder. Resolving an already resolved path changes nothing."""
        path = Path(path)
        return path if path.is_absolute() else (self.source.parent / path).absolute()

    @property
    def local_domains(self) -> frozenset[str]:
        return frozenset(self.domains)

    @property
    def postmaster_address(self) -> str:
        """Where mail to the postmaster goes: ``[server] postmaster``, or postmaster@ the
        first local domain (the host name when there is none)."""
        if self.server.postmaster is not None:
            return self.server.postmaster
        domain = min(self.domains) if self.domains else self.server.hostname
        return f"postmaster@{domain}"

    @property
    def postmaster_domains(self) -> frozenset[str]:
        """The domains whose ``postmaster`` is always accepted: every local one, the host name."""
        return frozenset(d.lower() for d in self.domains) | {self.server.hostname.lower()}


def load_settings(path: str | os.PathLike[str] = DEFAULT_CONFIG) -> Settings:
    """Read and validate ``path``; raise :class:`ConfigError` naming every problem."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{p}: no such file (pass --config PATH, or copy the shipped "
                           "elemta.toml)"]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([f"{p}: cannot read: {e}"]) from None
    return parse_settings(text, p)


def parse_settings(text: str, source: Path) -> Settings:
    try:
        doc = tomlkit.parse(text).unwrap()
    except tomlkit.exceptions.ParseError as e:
        raise ConfigError([f"{source}:{e.line}:{e.col}: TOML syntax error: "
                           f"{str(e).split(' at line ')[0]}"]) from None
    doc["source"] = source
    try:
        return Settings.model_validate(doc, context={"base_dir": source.parent})
    except pydantic.ValidationError as err:
        raise ConfigError(format_validation_error(err, str(source), root=Settings)) from None


def _strict(schema: type[BaseModel]) -> type[BaseModel]:
    """The plugin's schema, refusing unknown keys even if the plugin forgot to."""
    if schema.model_config.get("extra") == "forbid":
        return schema
    return type(schema.__name__, (schema,), {"model_config": {**schema.model_config,
                                                              "extra": "forbid"}})


def validate_plugin_tables(settings: Settings,
                           schemas: Mapping[str, type[BaseModel]]) -> dict[str, BaseModel]:
    """Validate every ``[plugins.<name>]`` table against the schema its plugin registered.

    Plugins that registered a schema but have no table get its defaults.
    """
    problems: list[str] = []
    out: dict[str, BaseModel] = {}
    src = str(settings.source)
    for name, table in settings.plugins.tables.items():
        schema = _strict(schemas[name]) if name in schemas else None
        if schema is None:
            close = suggest(name, list(schemas))
            hint = (f'; did you mean [plugins.{close[0]}]?' if close else
                    "; no enabled plugin declares it (enable the plugin or remove the table)")
            problems.append(f"{src}: [plugins.{name}]: unknown plugin table{hint}")
            continue
        try:
            out[name] = schema.model_validate(table, context={"base_dir": settings.source.parent})
        except pydantic.ValidationError as err:
            problems.extend(format_validation_error(err, src, ("plugins", name), schema))
    for name, schema in schemas.items():
        if name not in out and name not in settings.plugins.tables:
            try:
                out[name] = schema()
            except pydantic.ValidationError as err:
                problems.extend(format_validation_error(err, src, ("plugins", name), schema))
    if problems:
        raise ConfigError(problems)
    return out
