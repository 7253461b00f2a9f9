"""Replies are named in one module: no other code of the server spells one out."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from elemta import verdicts
from elemta.smtp import replies
from elemta.smtp.replies import Reply

ROOT = Path(__file__).resolve().parent.parent
REPLY_TEXT = re.compile(r"^[2-5][0-9][0-9][ -]")


def spelled_out_replies(path: Path) -> list[str]:
    """String constants (f-string parts included) that start like an SMTP reply."""
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and REPLY_TEXT.match(node.value):
            out.append(f"{shown}:{node.lineno}: {node.value[:40]!r}")
    return out


def test_the_smtp_layer_writes_only_named_replies():
    offenders = [hit for path in sorted((ROOT / "elemta" / "smtp").glob("*.py"))
                 if path.name != "replies.py" for hit in spelled_out_replies(path)]
    assert offenders == []


def test_the_rule_catches_a_spelled_out_reply(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text('def f(proto, host):\n    proto.reply(f"421 4.7.0 {host} busy")\n')
    assert spelled_out_replies(sample) == ["sample.py:2: '421 4.7.0 '"]


def test_reply_wire_form():
    assert replies.SENDER_OK.wire == b"250 2.1.0 Sender OK\r\n"
    assert str(replies.greeting("mx.example")) == "220 mx.example ESMTP Elemta"
    assert replies.ehlo_ok("mx.example", ["PIPELINING", "SIZE 10"]).wire == (
        b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 10\r\n")
    assert Reply.of(verdicts.Reject(554, "5.7.1", "No")).wire == b"554 5.7.1 No\r\n"
    assert replies.auth_temporary(verdicts.TempFail(451, "4.7.0", "later")).wire == (
        b"454 4.7.0 later\r\n")


def test_every_named_reply_has_an_enhanced_status_matching_its_code():
    named = {name: r for name, r in vars(replies).items() if isinstance(r, Reply)}
    assert len(named) > 40
    for name, reply in named.items():
        if reply.code in (220, 334, 354) or reply.enhanced is None:
            continue  # greetings, SASL challenges and 354 carry none (RFC 2034 §3)
        assert reply.enhanced[0] == str(reply.code)[0], name
