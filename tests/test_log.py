"""Log output formats, structured fields, idempotent set-up and redaction of secrets."""

from __future__ import annotations

import base64
import io
import json
import logging
import re
from typing import Iterator

import pytest

from elemta.config import LogSettings
from elemta.log import bind, kv, redact_text, setup_logging

TEXT_LINE = re.compile(
    r"^(?P<ts>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<level>[a-z]+) (?P<logger>\S+) (?P<rest>.*)$")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("elemta").level)
    mail = {n: (logging.getLogger(n).level, list(logging.getLogger(n).filters))
            for n in ("mail.log", "mail.debug")}
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger("elemta").setLevel(saved[2])
    for name, (level, filters) in mail.items():
        logging.getLogger(name).setLevel(level)
        logging.getLogger(name).filters[:] = filters


def configure(fmt: str = "text", level: str = "info") -> io.StringIO:
    out = io.StringIO()
    setup_logging(LogSettings(format=fmt, level=level), stream=out)
    return out


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def json_lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in lines(out)]


log = logging.getLogger("elemta.test")


def test_text_line_has_utc_timestamp_level_logger_message_and_fields():
    out = configure("text")
    kv(log, logging.INFO, "message queued", id="4f2a", size=1834, note="two words")

    (line,) = lines(out)
    m = TEXT_LINE.match(line)
    assert m, line
    assert m["level"] == "info"
    assert m["logger"] == "elemta.test"
    assert m["rest"] == 'message queued id=4f2a size=1834 note="two words"'


def test_json_lines_carry_ts_level_logger_msg_and_fields():
    out = configure("json")
    log.warning("plain %s", "args")
    kv(log, logging.ERROR, "delivery failed", id="4f2a", attempts=3, final=True)

    first, second = json_lines(out)
    assert first == {"ts": first["ts"], "level": "warning", "logger": "elemta.test",
                     "msg": "plain args"}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert second["msg"] == "delivery failed"
    assert (second["level"], second["id"], second["attempts"], second["final"]) == \
        ("error", "4f2a", 3, True)


def test_extra_fields_work_without_the_helper():
    out = configure("json")
    log.info("hello", extra={"fields": {"peer": "192.0.2.1"}})
    assert json_lines(out)[0]["peer"] == "192.0.2.1"


def test_a_field_cannot_overwrite_the_json_envelope():
    out = configure("json")
    kv(log, logging.INFO, "real message", msg="forged", level="error")
    (record,) = json_lines(out)
    assert (record["msg"], record["level"]) == ("real message", "info")
    assert (record["field.msg"], record["field.level"]) == ("forged", "error")


def test_bound_fields_appear_on_every_record_and_merge_with_extra():
    out = configure("json")
    session = bind(log, session="a1b2", peer="192.0.2.1")
    session.info("connected")
    kv(session, logging.INFO, "rcpt", rcpt="bob@example.org")

    first, second = json_lines(out)
    assert (first["session"], first["peer"]) == ("a1b2", "192.0.2.1")
    assert (second["session"], second["rcpt"]) == ("a1b2", "bob@example.org")


def test_level_setting_filters_lower_levels():
    out = configure("text", level="warning")
    log.info("hidden")
    kv(log, logging.DEBUG, "hidden too")
    log.warning("shown")
    assert [TEXT_LINE.match(line)["rest"] for line in lines(out)] == ["shown"]


def test_newlines_in_a_text_message_cannot_forge_a_log_line():
    out = configure("text")
    log.info("helo %s", "evil\r\n2026-01-01T00:00:00.000Z info elemta fake")
    assert len(lines(out)) == 1


def test_exception_is_logged_with_its_traceback():
    out = configure("json")
    try:
        raise ValueError("bad thing")
    except ValueError:
        log.exception("handler failed")
    (record,) = json_lines(out)
    assert "ValueError: bad thing" in record["exc"]


def test_setup_logging_twice_does_not_duplicate_output():
    first = io.StringIO()
    setup_logging(LogSettings(format="text"), stream=first)
    out = configure("json")
    log.info("once")

    assert len(lines(out)) == 1
    assert first.getvalue() == ""
    installed = [h for h in logging.getLogger().handlers if getattr(h, "_elemta", False)]
    assert len(installed) == 1


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_password_field_is_redacted(fmt):
    out = configure(fmt)
    kv(log, logging.INFO, "auth attempt", user="alice", password="hunter2",
       smtp_password="hunter3", nested={"api_token": "t0k3n"})
    text = out.getvalue()
    assert "hunter2" not in text and "hunter3" not in text and "t0k3n" not in text
    assert "alice" in text
    if fmt == "json":
        (record,) = json_lines(out)
        assert record["password"] == "***"
        assert record["nested"] == {"api_token": "***"}


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_auth_plain_initial_response_is_redacted(fmt):
    out = configure(fmt)
    blob = base64.b64encode(b"\0alice\0hunter2").decode()
    log.info("%r >> %r", ("192.0.2.1", 4321), f"AUTH PLAIN {blob}".encode())
    text = out.getvalue()
    assert blob not in text
    assert "AUTH PLAIN ***" in text


def test_auth_login_initial_response_and_inline_password_are_redacted():
    out = configure("text")
    log.info("client said: auth login %s", base64.b64encode(b"alice").decode())
    log.warning("datasource password=hunter2 user=alice failed")
    text = out.getvalue()
    assert "YWxpY2U=" not in text and "hunter2" not in text
    assert "password=*** user=alice" in text


def test_secret_in_a_field_value_string_is_redacted():
    out = configure("json")
    kv(log, logging.INFO, "bad command", line="AUTH PLAIN AGFsaWNlAGh1bnRlcjI=")
    assert json_lines(out)[0]["line"] == "AUTH PLAIN ***"


def test_secret_in_an_exception_message_is_redacted():
    out = configure("text")
    try:
        raise ConnectionError("login failed with password=hunter2")
    except ConnectionError:
        log.exception("relay auth failed")
    assert "hunter2" not in out.getvalue()


def test_redaction_leaves_ordinary_text_alone():
    text = "250 2.0.0 queued as 4f2a; AUTH required for relaying"
    assert redact_text(text) == text


def test_aiosmtpd_login_data_warning_is_dropped_and_its_chatter_stays_quiet():
    out = configure("text", level="debug")
    mail = logging.getLogger("mail.log")
    mail.warning("Session.login_data is deprecated and will be removed in version 2.0")
    mail.debug("%r >> %r", ("192.0.2.1", 4321), b"aHVudGVyMg==")
    mail.info("%r handling connection", ("192.0.2.1", 4321))
    mail.warning("%r unrecognised: %s", ("192.0.2.1", 4321), "FOO")

    (line,) = lines(out)
    assert "unrecognised: FOO" in line
    assert logging.getLogger("mail.log").level == logging.WARNING


def test_plugin_loggers_outside_elemta_go_through_the_same_handler():
    out = configure("json")
    kv(logging.getLogger("elemta_greylist"), logging.INFO, "deferred", secret="s3")
    (record,) = json_lines(out)
    assert (record["logger"], record["secret"]) == ("elemta_greylist", "***")


def test_the_fast_path_misses_nothing_the_pattern_catches():
    from elemta.log import redact_text

    for text in ("AUTH PLAIN AGFsaWNlAHNlY3JldA==", "Password: hunter2", "api_token=abc",
                 "\u017fecret=abc", "to\u212aen=abc", "credentials: 'x y'",
                 "auth\tlogin dXNlcg==", "C: AUTH\u00a0PLAIN AGFsaWNl", "AUTH\nXOAUTH2 dG9r"):
        assert "***" in redact_text(text), text
    for plain in ("01K0T1A63RQHYJVXH6F0: delivered to <u@remote.example> via mx: 250 2.0.0 Ok",
                  "01K0T1A63RQHYJVXH6F0: queued from=<a@b.example> nrcpt=1 size=4225 "
                  "session=01K0T1A63RQHYJVXH6F1 client=192.0.2.1 helo=mx tls=no auth=-",
                  "authenticated as alice", "AUTH=<>"):
        assert redact_text(plain) is plain
