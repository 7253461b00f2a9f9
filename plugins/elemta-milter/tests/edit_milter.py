"""A real milter, written with purepythonmilter (an independent, filter-side implementation
of the milter protocol), that exercises every modification an MTA must carry out.

    python edit_milter.py PORT

What it does depends on the message, so one process serves every test:

* RCPT TO ``refused@…``: ``550 5.1.1 no such user here`` (a custom reply at RCPT);
* MAIL FROM ``busy@…``: ``451 4.7.1 try again in a minute`` (at MAIL);
* MAIL FROM ``trusted@…``: SMFIR_ACCEPT (nothing more about this message);
* Subject ``skip body``: SMFIR_SKIP to the first body chunk;
* Subject ``edit me``: at the end of the message it appends ``X-Edit-Appended``, inserts
  ``X-Edit-Inserted`` at the top, changes ``Subject``, deletes ``X-Remove-Me``, replaces
  the body, adds ``added@example.test`` and ``added-par@example.test NOTIFY=NEVER``, deletes
  ``removed@example.test`` and changes the sender to ``changed@example.org``;
* Subject ``big body``: replaces the body with 200 KiB in several SMFIR_REPLBODY chunks;
* Subject ``quarantine me``: SMFIR_QUARANTINE, then continue;
* Subject ``discard me``: SMFIR_DISCARD; Subject ``reject me``: ``554 5.7.1 content refused``.

It asks for the macros it uses with SMFIR_SETSYMLIST (``j``, ``_``, ``{client_addr}``,
``{daemon_name}`` and ``{if_addr}`` at connect, ``{tls_version}`` at HELO, ``i``,
``{mail_addr}`` and ``{auth_authen}`` at MAIL, ``{rcpt_addr}`` at RCPT) and records what it saw in ``X-Edit-Session`` (connect, HELO)
and ``X-Edit-Seen`` (MAIL, RCPT).
"""

from __future__ import annotations

import sys
from typing import ClassVar

import attrs
import purepythonmilter as ppm
from purepythonmilter.protocol.definitions import MacroStage
from purepythonmilter.protocol.payload import Payload
from purepythonmilter.protocol.responses import AbstractManipulation

STATE: dict[str, str] = {}
SESSION: dict[str, str] = {}


@attrs.define(auto_attribs=False, kw_only=True)
class Quarantine(AbstractManipulation):
    """SMFIR_QUARANTINE sent before the final reply, as libmilter's smfi_quarantine does
    (purepythonmilter 0.0.1's own Quarantine has no encoder)."""

    response_char: ClassVar[bytes] = b"q"
    reason: str = attrs.field()

    def encode(self) -> Payload:
        return Payload(self.response_char + self.reason.encode() + b"\0")

BIG_LINE = b"0123456789abcdef" * 4 + b"\r\n"


def _macros(macros: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(macros.items()))


async def on_connect(cmd: ppm.Connect) -> ppm.VerdictOrContinue:
    SESSION.clear()
    SESSION["connect"] = f"{cmd.connection_info_args.hostname}|{_macros(cmd.macros)}"
    return ppm.Continue()


async def on_helo(cmd: ppm.Helo) -> ppm.VerdictOrContinue:
    SESSION["helo"] = f"{cmd.hostname}|{_macros(cmd.macros)}"
    return ppm.Continue()


async def on_mail_from(cmd: ppm.MailFrom) -> ppm.VerdictOrContinue:
    STATE.clear()
    STATE["sender"] = cmd.address
    STATE["macros"] = _macros(cmd.macros)
    if cmd.address.startswith("trusted@"):
        return ppm.Accept()            # nothing more about this message
    if cmd.address.startswith("busy@"):
        return ppm.TempFailWithCode(primary_code=(4, 5, 1), enhanced_code=(4, 7, 1),
                                    text="try again in a minute")
    return ppm.Continue()


async def on_rcpt_to(cmd: ppm.RcptTo) -> ppm.VerdictOrContinue:
    if cmd.address.startswith("refused@"):
        return ppm.RejectWithCode(primary_code=(5, 5, 0), enhanced_code=(5, 1, 1),
                                  text="no such user here")
    STATE["rcpt_macros"] = _macros(cmd.macros)
    return ppm.Continue()


async def on_header(cmd: ppm.Header) -> None:
    """Annotated ``-> None``: purepythonmilter then asks for no reply (SMFIP_NR_HDR)."""
    if cmd.name.lower() == "subject":
        STATE["subject"] = cmd.text.strip()


async def on_body_chunk(cmd: ppm.BodyChunk) -> ppm.VerdictOrContinue | ppm.SkipToNextStage:
    STATE["chunks"] = str(int(STATE.get("chunks", "0")) + 1)
    if STATE.get("subject") == "skip body":
        return ppm.SkipToNextStage()
    return ppm.Continue()


async def on_end_of_message(cmd: ppm.EndOfMessage) -> ppm.AbstractResponse:
    subject = STATE.get("subject", "")
    seen = [ppm.AppendHeader(headername="X-Edit-Seen",
                             headertext=f"{STATE.get('macros', '')};{STATE.get('rcpt_macros', '')}"),
            ppm.AppendHeader(headername="X-Edit-Session",
                             headertext=f"{SESSION.get('connect')};{SESSION.get('helo')}"),
            ppm.AppendHeader(headername="X-Edit-Chunks", headertext=STATE.get("chunks", "0"))]
    if subject == "edit me":
        return ppm.Continue(manipulations=seen + [
            ppm.AppendHeader(headername="X-Edit-Appended", headertext="appended"),
            ppm.InsertHeader(index=0, headername="X-Edit-Inserted", headertext="at the top"),
            ppm.ChangeHeader(headername="Subject", headertext="edited", nth_occurrence=1),
            ppm.ChangeHeader(headername="X-Remove-Me", headertext="", nth_occurrence=1),
            ppm.ReplaceBodyChunk(chunk=b"The body the milter wrote.\r\n"),
            ppm.AddRecipient(recipient="<added@example.test>"),
            ppm.AddRecipientWithEsmtpArgs(recipient="<added-par@example.test>",
                                          esmtp_args={"NOTIFY": "NEVER"}),
            ppm.RemoveRecipient(recipient="<removed@example.test>"),
            ppm.ChangeMailFrom(mail_from="<changed@example.org>"),
        ])
    if subject == "big body":
        body = BIG_LINE * (200 * 1024 // len(BIG_LINE))
        chunks = [ppm.ReplaceBodyChunk(chunk=body[i:i + 60000])
                  for i in range(0, len(body), 60000)]
        return ppm.Continue(manipulations=seen + chunks)
    if subject == "quarantine me":
        return ppm.Continue(manipulations=[Quarantine(reason="held for review")])
    if subject == "discard me":
        return ppm.DiscardMessage()
    if subject == "reject me":
        return ppm.RejectWithCode(primary_code=(5, 5, 4), enhanced_code=(5, 7, 1),
                                  text="content refused")
    return ppm.Continue(manipulations=seen)


milter = ppm.PurePythonMilter(
    name="edit_milter",
    hook_on_connect=on_connect,
    hook_on_helo=on_helo,
    hook_on_mail_from=on_mail_from,
    hook_on_rcpt_to=on_rcpt_to,
    hook_on_header=on_header,
    hook_on_body_chunk=on_body_chunk,
    hook_on_end_of_message=on_end_of_message,
    can_add_headers=True,
    can_change_headers=True,
    can_change_body=True,
    can_add_recipients=True,
    can_add_recipients_with_esmtp_args=True,
    can_remove_recipients=True,
    can_change_mail_from=True,
    can_quarantine=True,
    restrict_symbols={MacroStage.CONNECT: {"j", "_", "{client_addr}", "{daemon_name}",
                                           "{if_addr}"},
                      MacroStage.HELO: {"{tls_version}"},
                      MacroStage.MAIL_FROM: {"i", "{mail_addr}", "{auth_authen}"},
                      MacroStage.RCPT_TO: {"{rcpt_addr}"}},
)

if __name__ == "__main__":
    milter.run_server(host="127.0.0.1", port=int(sys.argv[1]))
