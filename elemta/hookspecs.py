"""The Elemta plugin contract.

Every stage of a message's life is a hook. A plugin implements a hook with a
function of the same name decorated with :data:`elemta.hookimpl`; it may be
``def`` or ``async def`` and may accept any subset of the arguments.

How each hook is dispatched is data, not prose: every spec below carries a
:class:`Dispatch` (its :class:`Mode` and the result types it allows), and the
core's dispatcher (``hookcall``) reads it. No call site chooses a mode. The
modes, in ``[plugins] enabled`` order, built-ins last:

* **first verdict wins** — implementations are awaited one after the other;
  ``None`` asks the next one; the first verdict stops the stage. If none
  answers, the stage's default applies.
* **first answer wins** — the same for hooks that return a value rather than
  a verdict.
* **collect all** — every implementation runs and all non-``None`` results are
  kept (a list is flattened); **collect all, concurrently** runs them at once.
* **notify** — every implementation runs; results are ignored; an exception is
  logged and does not change what the client is told. **notify, fatal**: an
  exception stops the server (``startup``); **notify, in reverse order**:
  the last plugin first (``shutdown``).
* **collect all, at start-up** and **notify, at start-up** — plain ``def``
  implementations called where there may be no event loop (``register_*``).

A plugin that raises, exceeds its timeout (``[plugins] timeout_seconds``) or
returns a value its stage does not allow makes the client get
``451 4.3.0`` and a log line naming the plugin. It is never treated as a pass.

The full reference with examples is ``docs/plugins.md``. Longer than 500 lines because
it is the whole contract in one place: one spec, with its dispatch and docstring, per hook.
"""

from __future__ import annotations

import enum
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypeVar

import pluggy

from .models import AuthResult, DkimKey, Outcome, Route, ScramKeys
from .verdicts import Accept, Disconnect, Discard, Quarantine, Reject, TempFail

if TYPE_CHECKING:
    import click
    import prometheus_client
    import pydantic

    from .app import App
    from .config import ListenerSettings
    from .models import Credentials, Message, Recipient, Session, Transaction
    from .spool.envelope import Envelope, RecipientState
    from .verdicts import Verdict

PROJECT = "elemta"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Mode(enum.Enum):
    """How the dispatcher calls a hook's implementations; the value is how the docs say it."""

    FIRST_VERDICT = "first verdict wins"
    FIRST_ANSWER = "first answer wins"
    COLLECT = "collect all"
    COLLECT_CONCURRENT = "collect all, concurrently"
    NOTIFY = "notify"
    NOTIFY_FATAL = "notify, fatal"
    NOTIFY_REVERSE = "notify, in reverse order"
    STARTUP_COLLECT = "collect all, at start-up"
    STARTUP_NOTIFY = "notify, at start-up"

    # Set below for each member: plain attributes, read on every hook call.
    is_first: bool
    is_collect: bool
    at_startup: bool  # plain ``def`` implementations, called without awaiting (``register_*``)


for _mode in Mode:
    _mode.is_first = _mode in (Mode.FIRST_VERDICT, Mode.FIRST_ANSWER)
    _mode.is_collect = _mode in (Mode.COLLECT, Mode.COLLECT_CONCURRENT, Mode.STARTUP_COLLECT)
    _mode.at_startup = _mode in (Mode.STARTUP_COLLECT, Mode.STARTUP_NOTIFY)
del _mode


@dataclass(frozen=True, slots=True)
class Dispatch:
    """A hook's dispatch: its mode and what an implementation may answer.

    ``allowed`` are the types of a non-``None`` answer (for the collect modes,
    of each item: a list or tuple answer is flattened). ``items``, when set,
    means the answer is a list whose every element must be one of these types
    (``deliver``'s outcomes). ``None`` is always allowed.
    """

    mode: Mode
    allowed: tuple[type, ...] = ()
    items: tuple[type, ...] = ()

    def describe_allowed(self) -> str:
        names = " or ".join(t.__name__ for t in self.allowed)
        if self.items:
            names += " of " + " or ".join(t.__name__ for t in self.items)
        if self.mode.is_collect and not self.mode.at_startup:
            names += ", a list of them"
        return names + " or None" if names else "None"


SMTP_VERDICTS: tuple[type, ...] = (Accept, Reject, TempFail, Disconnect)
DATA_VERDICTS: tuple[type, ...] = (*SMTP_VERDICTS, Discard, Quarantine)

_F = TypeVar("_F", bound=Callable[..., Any])


def dispatch(mode: Mode, allowed: tuple[type, ...] = (), items: tuple[type, ...] = ()
             ) -> Callable[[_F], _F]:
    """Attach a hook's :class:`Dispatch` to its spec (read with :func:`dispatch_of`)."""
    def mark(spec: _F) -> _F:
        spec.elemta_dispatch = Dispatch(mode, allowed, items)  # type: ignore[attr-defined]
        return spec
    return mark


def dispatch_of(hook: str) -> Dispatch:
    """The dispatch of hook ``hook``; ``KeyError`` for a name that is not a hook."""
    spec = globals().get(hook)
    found = getattr(spec, "elemta_dispatch", None)
    if found is None or not hasattr(spec, PROJECT + "_spec"):
        raise KeyError(hook)
    return found

# --------------------------------------------------------------------- lifecycle


@hookspec
@dispatch(Mode.STARTUP_COLLECT, (Mapping,))
def register_config() -> Mapping[str, type[pydantic.BaseModel]] | None:
    """Declare the schema of this plugin's configuration tables (``def`` only).

    Return a mapping from section name to a pydantic model; ``[plugins.<name>]``
    in ``elemta.toml`` is validated against it (unknown keys are errors) and the
    result is available as ``app.plugin_settings(name)``. A table with no
    registered schema is an error, so misspelled plugin names are caught.

    Dispatch: collect all, at start-up (and in ``elemta check-config``).
    """


@hookspec
@dispatch(Mode.STARTUP_NOTIFY)
def register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``elemta`` command line (``cli.add_command(...)``; ``def`` only).

    Dispatch: notify, at start-up (of the command line).
    """


@hookspec
@dispatch(Mode.STARTUP_NOTIFY)
def register_metrics(registry: prometheus_client.CollectorRegistry) -> None:
    """Create this plugin's Prometheus metrics in the server's registry (``def`` only).

    Dispatch: notify, at start-up, once before ``startup``.
    """


@hookspec
@dispatch(Mode.NOTIFY_FATAL)
def startup(app: App) -> None:
    """The server is starting: open connections, start background tasks.

    Runs after configuration and metrics, before spool recovery and before any
    listener accepts. An exception stops start-up with the plugin named.

    Dispatch: notify, fatal (awaited in order).
    """


@hookspec
@dispatch(Mode.NOTIFY_REVERSE)
def shutdown(app: App) -> None:
    """The server is stopping: listeners are closed and sessions have ended.

    Dispatch: notify, in reverse order; exceptions are logged.
    """


@hookspec
@dispatch(Mode.FIRST_ANSWER, (ssl.SSLContext,))
def tls_context(listener: ListenerSettings) -> ssl.SSLContext | None:
    """Return the server TLS context for ``listener`` (STARTTLS or implicit TLS).

    The built-in answers from ``[tls]`` certificate files (or a self-signed
    certificate it generates on first start). A certificate plugin (ACME)
    answers first to take over. Asked at start-up for every TLS listener, and
    again on every reload (SIGHUP, or ``App.reload_tls()``): the context
    returned then serves new connections, while sessions already open keep
    theirs. A reload that fails keeps the context in service.

    Dispatch: first answer wins.
    """


@hookspec
@dispatch(Mode.NOTIFY)
def reload(app: App) -> None:
    """The operator asked the server to reload (SIGHUP, or ``await app.reload()``).

    Runs after the TLS contexts were asked again (``tls_context``). Read again
    what may have changed outside the configuration file (key files, a cache of
    a datasource's answers); keep what is in service when the new one cannot be
    used, and log why. ``elemta.toml`` itself is not read again: its changes
    need a restart.

    Dispatch: notify (awaited in order); an exception is logged and the other
    plugins still reload.
    """


@hookspec
@dispatch(Mode.STARTUP_COLLECT, (Mapping,))
def control_commands() -> Mapping[str, Callable[[dict[str, Any]], Any]] | None:
    """Commands this plugin answers on the server's control socket (``def`` only).

    Return a mapping from command name (``"dkim.keys"``: prefix it with the
    plugin's name) to a handler ``handler(args: dict) -> dict`` (``def`` or
    ``async def``) whose answer is JSON-serialisable. A plugin's command line
    asks the running server with ``elemta.control_request(name, args)``. A
    handler raising ``ValueError`` answers that message as an error (a bad
    request); any other exception is logged and answered as a failure. Asked
    once after ``startup``; two plugins naming the same command stop start-up.

    Dispatch: collect all, at start-up.
    """


# ------------------------------------------------------------------ SMTP stages


@hookspec
@dispatch(Mode.FIRST_VERDICT, SMTP_VERDICTS)
def connect(session: Session) -> Verdict | None:
    """A client connected; called before the ``220`` greeting.

    ``Reject`` answers the greeting with ``554`` and the verdict's enhanced code
    and text (RFC 5321 §3.1): the client may then only QUIT (NOOP, RSET and HELP
    are answered too; every other command gets ``503 5.5.1``). ``TempFail`` and
    ``Disconnect`` answer ``421`` (or the ``Disconnect`` code) and close.
    ``Accept`` greets at once and skips later ``connect`` plugins; headers on it
    are added to every message of the session. A plugin failure here answers
    ``421 4.3.0`` and closes, since a 451 is no valid greeting.

    Dispatch: first verdict wins. Default: greet with ``220``.
    """


@hookspec
@dispatch(Mode.FIRST_VERDICT, SMTP_VERDICTS)
def helo(session: Session, hostname: str) -> Verdict | None:
    """HELO or EHLO ``hostname`` (``session.esmtp`` tells which).

    A ``Reject`` or ``TempFail`` answers HELO/EHLO and the session stays without
    a HELO name. Dispatch: first verdict wins. Default: ``250``.
    """


@hookspec
@dispatch(Mode.FIRST_VERDICT, SMTP_VERDICTS)
def auth(session: Session, mechanism: str, credentials: Credentials) -> Verdict | None:
    """AUTH ``mechanism`` with decoded ``credentials``: a datasource answers.

    ``Accept`` authenticates the session as ``credentials.login`` (``235 2.7.0``),
    or as ``Accept(identity=…)`` when the plugin knows a canonical name for it.
    ``Reject`` answers ``535 5.7.8`` whatever its code, so that replies never
    tell which part of the credentials was wrong. ``TempFail`` (and a plugin
    failure) answers ``454 4.7.0``, the RFC 4954 temporary code. ``Disconnect``
    replies and closes. With no answer at all the login fails: there is no
    "accept everybody" default. After ``[server] max_auth_failures`` failures the
    session is closed with ``421 4.7.0``.

    Dispatch: first verdict wins. Default: ``535 5.7.8``.
    """


@hookspec
@dispatch(Mode.STARTUP_COLLECT, (list, tuple))
def auth_mechanisms() -> list[str] | None:
    """The SASL mechanisms this plugin can check now, asked once after ``startup``.

    Only for a plugin whose ``auth`` or ``scram_keys`` works for some
    configurations and not others (passwords in LDAP have no SCRAM keys).
    Without it, a plugin implementing ``auth`` counts for ``PLAIN`` and
    ``LOGIN``, and one implementing ``scram_keys`` for ``SCRAM-SHA-256``. EHLO
    offers the union over plugins.

    Dispatch: collect all, at start-up (plain ``def``). Default: by the hooks
    the plugin implements.
    """


@hookspec
@dispatch(Mode.FIRST_ANSWER, (ScramKeys,))
def scram_keys(session: Session, mechanism: str, login: str) -> ScramKeys | None:
    """AUTH SCRAM-SHA-256: the stored :class:`~elemta.ScramKeys` of ``login``.

    The core runs the SCRAM exchange (RFC 5802, RFC 7677) and needs only what
    a server stores; the password never crosses the wire. Answer ``None`` for
    an unknown or disabled login: the exchange then goes on with made-up keys
    and fails like a wrong password, so a client cannot tell which it was.
    SCRAM-SHA-256 is offered only while some plugin implements this hook.

    Dispatch: first answer wins. Default: the login fails (``535 5.7.8``).
    """


@hookspec
@dispatch(Mode.FIRST_ANSWER, (bool,))
def authorize(session: Session, login: str, authzid: str) -> bool | None:
    """May ``login``, whose password was just accepted, act as ``authzid``?

    Asked only when a client sends an authorization identity (PLAIN's first
    field, RFC 4616) that differs from its login. ``True`` authenticates
    the session as ``authzid`` (``session.auth_user``); ``False`` or no answer
    fails the login with ``535 5.7.8``, as RFC 4616 asks.

    Dispatch: first answer wins. Default: refused.
    """


@hookspec
@dispatch(Mode.FIRST_VERDICT, SMTP_VERDICTS)
def mail(session: Session, tx: Transaction, sender: str,
         params: dict[str, str | None]) -> Verdict | None:
    """MAIL FROM:<``sender``> with its ESMTP ``params`` (``""`` is the null sender).

    The address syntax, SIZE and BODY/SMTPUTF8 have been checked by the core.
    Dispatch: first verdict wins. Default: ``250 2.1.0``.
    """


@hookspec
@dispatch(Mode.FIRST_VERDICT, SMTP_VERDICTS)
def rcpt(session: Session, tx: Transaction, recipient: Recipient,
         params: dict[str, str | None]) -> Verdict | None:
    """RCPT TO:<``recipient.address``> with its ESMTP ``params``.

    ``Accept`` adds the recipient (``250 2.1.5``). The built-in relay policy
    (``trylast``) accepts local domains and, for authenticated or
    relay-permitted sessions, any domain; otherwise ``550 5.7.1``: the stage is
    default-deny, so a plugin that knows a recipient is valid answers ``Accept``
    and one that knows it is not answers ``Reject``.

    Dispatch: first verdict wins. Default (no built-in): ``550 5.7.1``.
    """


@hookspec
@dispatch(Mode.FIRST_VERDICT, (Reject, TempFail, Disconnect))
def rcpt_ok(session: Session, tx: Transaction, recipient: Recipient) -> Verdict | None:
    """The ``rcpt`` stage accepted ``recipient``; a plugin may still refuse it.

    For policies that should see only recipients that exist (greylisting,
    limits per recipient): they run after validation whatever the plugin
    order. ``Reject``, ``TempFail`` or ``Disconnect`` refuse the recipient;
    ``None`` lets it be. Not called for the postmaster, which is always
    accepted.

    Dispatch: first verdict wins. Default: ``250 2.1.5``.
    """


@hookspec
@dispatch(Mode.COLLECT_CONCURRENT, (AuthResult,))
def message_auth(session: Session, tx: Transaction,
                 message: Message) -> AuthResult | list[AuthResult] | None:
    """End of DATA: authenticate the message (SPF, DKIM, ARC…).

    Return one :class:`~elemta.AuthResult`, a list of them, or ``None``.
    All implementations run **concurrently**; their results go to ``data`` and
    into the one ``Authentication-Results`` header the core writes.

    Dispatch: collect all, concurrently.
    """


@hookspec
@dispatch(Mode.FIRST_VERDICT, DATA_VERDICTS)
def data(session: Session, tx: Transaction, message: Message,
         auth_results: list[AuthResult]) -> Verdict | None:
    """End of DATA, after ``message_auth``: policy and content filters (DMARC…).

    ``auth_results`` holds every ``message_auth`` result; a plugin may append its
    own (DMARC adds its verdict) and they all go into Authentication-Results.
    Allowed verdicts: ``Accept``, ``Reject``, ``TempFail``, ``Disconnect``,
    ``Discard`` (``250``, never spooled) and ``Quarantine`` (``250``, spooled on
    hold). Headers of every verdict so far are prepended to the message.

    Dispatch: first verdict wins. Default: spool the message, then ``250 2.0.0``.
    """


@hookspec
@dispatch(Mode.FIRST_ANSWER, (str,))
def received_header(session: Session, tx: Transaction, message: Message) -> str | None:
    """Return the value of the ``Received:`` header to prepend (RFC 5321 §4.4).

    The built-in writes the standard trace field with the TLS and AUTH facts; a
    plugin answers first to replace it (for example to hide a submission
    client's address) or returns ``""`` to add none.

    Dispatch: first answer wins.
    """


@hookspec
@dispatch(Mode.FIRST_ANSWER, (str,))
def authentication_results_header(session: Session, tx: Transaction, message: Message,
                                  auth_results: list[AuthResult]) -> str | None:
    """Return the value of the ``Authentication-Results:`` header (RFC 8601).

    Before this hook the core has removed received Authentication-Results fields
    that carry this server's authserv-id (forgeries, RFC 8601 §5). The built-in
    writes one field naming this host, one result per folded line, or ``""`` (no
    header) when there are no results.

    Dispatch: first answer wins.
    """


@hookspec
@dispatch(Mode.NOTIFY)
def queued(session: Session, tx: Transaction, envelope: Envelope) -> None:
    """The message is durably in the spool; ``250`` has not been sent yet.

    Durable in the spool's journal: its files appear a moment later, and it
    may be acted on in the spool only once those are durable too.

    Dispatch: notify. An exception is logged; the message stays accepted.
    """


@hookspec
@dispatch(Mode.NOTIFY)
def disconnect(session: Session) -> None:
    """The connection is closed (by either side). Dispatch: notify."""


# -------------------------------------------------------------- delivery (runner)


@hookspec
@dispatch(Mode.FIRST_ANSWER, (Route,))
def route(envelope: Envelope, recipient: RecipientState) -> Route | None:
    """Decide how one pending recipient is delivered.

    Return a :class:`~elemta.Route`. The built-in (``trylast``) answers
    from ``[delivery.routes]`` (the recipient's domain, then ``"*"``) and
    otherwise routes to the domain's MX over SMTP. Recipients with equal routes
    are delivered together.

    Dispatch: first answer wins.
    """


@hookspec
@dispatch(Mode.FIRST_ANSWER, (list,), items=(Outcome,))
def deliver(envelope: Envelope, route: Route, recipients: list[RecipientState],
            content_path: str) -> list[Outcome] | None:
    """Deliver the message at ``content_path`` to ``recipients`` along ``route``.

    A transport answers for the routes it owns (``route.transport``) with one
    :class:`~elemta.Outcome` per recipient, and ``None`` for the others.
    The built-in SMTP transport answers for ``"smtp"``. A recipient without an
    outcome, a transport that raises or times out, or a route no transport
    claims is a temporary failure (``451 4.3.0``): the message stays queued.
    ``content_path`` may be a memory file of this process (``/proc/self/fd/N``):
    open it here and pass another process the descriptor, not the path.

    Dispatch: first answer wins.
    """


@hookspec
@dispatch(Mode.NOTIFY)
def delivered(envelope: Envelope, recipient: RecipientState, outcome: Outcome) -> None:
    """A recipient was delivered; it will never be delivered again. Dispatch: notify."""


@hookspec
@dispatch(Mode.COLLECT, (int, float, Discard))
def deferred(envelope: Envelope, recipient: RecipientState,
             outcome: Outcome) -> float | Discard | None:
    """A recipient failed temporarily and will be retried.

    Return a number of seconds to retry sooner or later than the configured
    schedule (the smallest answer over the message's recipients wins), or
    ``Discard`` to stop trying this recipient without a bounce.

    Dispatch: collect all.
    """


@hookspec
@dispatch(Mode.NOTIFY)
def bounced(envelope: Envelope, recipient: RecipientState, outcome: Outcome) -> None:
    """A recipient failed for good (5xx, or the retry deadline passed). Dispatch: notify."""


@hookspec
@dispatch(Mode.FIRST_ANSWER, (bytes, Discard))
def bounce(envelope: Envelope, outcomes: list[Outcome], message: bytes) -> bytes | Discard | None:
    """A delivery status notification is about to be queued to ``envelope.sender``.

    ``message`` is the RFC 3464 report built by the core. Return replacement
    bytes, ``Discard`` to send none, or ``None`` to send it as it is. Never
    called for the null sender: bounces are not bounced.

    Dispatch: first answer wins.
    """


# --------------------------------------------------- lookups (plugins ask plugins)


@hookspec
@dispatch(Mode.FIRST_ANSWER, (Mapping,))
def rate_limits(kind: str, key: str) -> Mapping[str, int | None] | None:
    """The message limits of one sending domain or user, kept by a datasource.

    ``kind`` is ``"domain"`` (``key``: the sender's domain, lower case) or
    ``"user"`` (``key``: the authenticated login, lower case). Answer a mapping
    with ``"per_hour"`` and/or ``"per_day"``: a number of messages, ``0`` for
    no limit, ``None`` (or the key left out) for no opinion; ``None`` when the
    domain or user has no limits of its own. A rate limiter asks it through
    ``await app.rate_limits(kind, key)`` and lets the answer override its own
    configuration for that window.

    Dispatch: first answer wins. Default: no limits of its own.
    """


@hookspec
@dispatch(Mode.FIRST_ANSWER, (list,), (DkimKey,))
def dkim_keys(domain: str) -> list[DkimKey] | None:
    """The DKIM signing keys a key store holds for ``domain`` (lower case, A-labels).

    Answer every key of the domain, whatever its validity dates, as a list of
    :class:`~elemta.DkimKey` (the signer picks, per algorithm, the one valid
    now that became valid last), or ``None`` when the store has no key for
    the domain, so the next plugin is asked. A DKIM signer asks it through
    ``await app.dkim_keys(domain)`` for the domains its own configuration has
    no keys for, and keeps the answer a short while.

    Dispatch: first answer wins. Default: the domain has no keys (not signed).
    """


def hook_names() -> list[str]:
    """Every hook name of the contract, sorted."""
    return sorted(name for name, obj in globals().items()
                  if callable(obj) and hasattr(obj, PROJECT + "_spec"))
