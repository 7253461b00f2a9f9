"""elemta-dmarc in a real server: DMARC applied at the end of DATA.

The SPF and DKIM results come from a small plugin defined here (``Results``),
whose ``message_auth`` answers what each test chooses; the DMARC records come
from the local DNS server.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from elemta import Accept, AuthResult, ConfigError, StartupError, hookimpl
from elemta.testing import run_cli, send_mail
from elemta_dmarc.store import read_rows


class Results:
    """``message_auth`` answers these SPF and DKIM results; any login is accepted."""

    def __init__(self, spf: tuple[str, str] | None = None,
                 dkim: list[tuple[str, str]] | None = None) -> None:
        self.spf = spf
        self.dkim = dkim or []

    @hookimpl
    def message_auth(self, session, tx):
        results = []
        if self.spf is not None:
            domain, result = self.spf
            results.append(AuthResult("spf", result, properties={
                "smtp.mailfrom": tx.sender or "", "smtp.helo": session.helo or ""}
                | ({"smtp.mailfrom": f"{tx.sender.split('@')[0]}@{domain}"}
                   if tx.sender else {})))
        for domain, result in self.dkim:
            results.append(AuthResult("dkim", result,
                                      properties={"header.d": domain, "header.s": "sel"}))
        return results

    @hookimpl
    def auth(self, credentials):
        return Accept()


def message(from_: str | list[str] | None, subject: str = "hello") -> str:
    froms = [from_] if isinstance(from_, str) else (from_ or [])
    head = "".join(f"From: {f}\n" for f in froms)
    return f"{head}To: user@example.test\nSubject: {subject}\n\nHi.\n"


@pytest.fixture
def zones(dns_server):
    for domain, record in [("reject.example", "v=DMARC1; p=reject; rua=mailto:d@reject.example"),
                           ("quarantine.example", "v=DMARC1; p=quarantine"),
                           ("none.example", "v=DMARC1; p=none; sp=none; np=reject")]:
        dns_server.zone(domain)
        dns_server.add(f"_dmarc.{domain}", "TXT", record)
    return dns_server


def config(dns_server, **dmarc) -> dict:
    return {"dns": {"nameservers": [dns_server.nameserver], "timeout_seconds": 1,
                    "attempts": 1},
            "plugins": {"dmarc": {"metrics_domains": ["reject.example", "none.example"],
                                  **dmarc}}}


async def start(elemta_server, dns_server, results: Results, outbox=None, extra=None, **dmarc):
    cfg = config(dns_server, **dmarc)
    if extra:
        cfg.update(extra)
    return await elemta_server(cfg, enabled=["dmarc"], plugins=[("results", results)],
                               outbox=outbox)


def stored(server, queue_id: str) -> bytes:
    server.app.spool.wait_written()
    return (server.spool_path / "messages" / queue_id).read_bytes()


def header_block(raw: bytes) -> str:
    return raw.split(b"\r\n\r\n", 1)[0].decode()


def auth_results_headers(raw: bytes) -> list[str]:
    unfolded = re.sub(r"\r\n[ \t]+", " ", header_block(raw))
    return [line for line in unfolded.split("\r\n")
            if line.lower().startswith("authentication-results:")]


async def report_rows(server) -> list[dict]:
    """The report rows, once the rows handed over so far are written (they are batched)."""
    plugin = server.app.pm.get_plugin("dmarc")
    if plugin.store is not None:
        await plugin.store.drain()
    path = Path(server.settings.server.state_dir) / "dmarc-reports.sqlite3"
    return await asyncio.to_thread(read_rows, path)


async def metric(server, name: str, **labels: str) -> float | None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.metrics_port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    body = (await reader.read()).decode()
    writer.close()
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in body.splitlines():
        if line.startswith(f"{name}{{"):
            got = line[len(name) + 1:line.index("}")]
            if ",".join(sorted(got.split(","))) == want:
                return float(line.rsplit(" ", 1)[1])
    return None


# ------------------------------------------------------------------ the three policies


async def test_p_reject_with_failing_alignment_is_refused_at_data(elemta_server, zones):
    server = await start(elemta_server, zones, Results(spf=("bulk.example.net", "pass"),
                                                       dkim=[("example.net", "pass")]))

    sent = await send_mail(server, "news@bulk.example.net", ["user@example.test"],
                           message("Boss <boss@reject.example>"))

    assert (sent.reply.code, sent.reply.enhanced) == (550, "5.7.1"), sent.reply
    assert "DMARC policy of reject.example" in sent.reply.text
    assert "(p=reject)" in sent.reply.text
    server.app.spool.wait_written()
    assert not list((server.spool_path / "messages").iterdir())
    [row] = await report_rows(server)
    assert (row["header_from"], row["result"], row["disposition"]) == \
        ("reject.example", "fail", "reject")
    assert (row["spf_domain"], row["spf_result"], row["spf_aligned"]) == \
        ("bulk.example.net", "pass", 0)
    assert row["dkim"] == [{"domain": "example.net", "selector": "sel", "result": "pass"}]
    assert (row["source_ip"], row["helo"], row["envelope_from"], row["envelope_to"]) == \
        ("127.0.0.1", "client.example", "bulk.example.net", "example.test")
    assert (row["policy_domain"], row["p"], row["pct"], row["adkim"], row["aspf"]) == \
        ("reject.example", "reject", 100, "r", "r")
    assert row["rua"] == ["mailto:d@reject.example"]
    assert await metric(server, "smtp_dmarc_results_total", domain="reject.example",
                        result="fail") == 1.0


async def test_p_reject_with_an_aligned_dkim_pass_is_accepted_and_annotated(elemta_server,
                                                                          zones):
    server = await start(elemta_server, zones, Results(spf=("bulk.example.net", "pass"),
                                                       dkim=[("reject.example", "pass")]))

    sent = await send_mail(server, "news@bulk.example.net", ["user@example.test"],
                           message("boss@reject.example"))

    assert sent.accepted, sent.reply
    [header] = auth_results_headers(stored(server, sent.queue_id))
    assert "spf=pass smtp.mailfrom=news@bulk.example.net" in header
    assert "dkim=pass header.d=reject.example" in header
    assert "dmarc=pass header.from=reject.example policy.dmarc=reject" in header
    [row] = await report_rows(server)
    assert (row["result"], row["dkim_aligned"], row["disposition"]) == ("pass", 1, "none")
    assert await metric(server, "smtp_dmarc_results_total", domain="reject.example",
                        result="pass") == 1.0


async def test_p_quarantine_holds_the_message_until_it_is_released(elemta_server, zones,
                                                                  elemta_outbox):
    server = await start(elemta_server, zones, Results(spf=("bulk.example.net", "pass")),
                         outbox=elemta_outbox)

    sent = await send_mail(server, "news@bulk.example.net", ["user@example.test"],
                           message("boss@quarantine.example"))

    assert sent.accepted, sent.reply
    server.app.spool.wait_written()
    held = server.spool_path / "hold" / f"{sent.queue_id}.json"
    assert held.exists()
    envelope = json.loads(held.read_bytes())
    assert "DMARC fail for quarantine.example: p=quarantine" in envelope["hold_reason"]
    [header] = auth_results_headers(stored(server, sent.queue_id))
    assert "dmarc=fail header.from=quarantine.example policy.dmarc=quarantine" in header
    assert not elemta_outbox.messages

    released = await asyncio.to_thread(run_cli, "queue", "release", sent.queue_id,
                                       config=server.config_path)

    assert released.exit_code == 0, released.stderr
    [delivered] = await elemta_outbox.wait(1)
    assert delivered.recipients == ["user@example.test"]
    assert len(delivered.headers("Authentication-Results")) == 1
    assert "dmarc=fail" in delivered.header("Authentication-Results")
    # "other": quarantine.example is not in metrics_domains
    assert await metric(server, "smtp_dmarc_results_total", domain="other",
                        result="fail") == 1.0


async def test_p_none_only_annotates(elemta_server, zones):
    server = await start(elemta_server, zones, Results(spf=("bulk.example.net", "fail")))

    sent = await send_mail(server, "news@bulk.example.net", ["user@example.test"],
                           message("boss@none.example"))

    assert sent.accepted, sent.reply
    raw = stored(server, sent.queue_id)
    [header] = auth_results_headers(raw)
    assert header.startswith("Authentication-Results: mx.example.test;")
    assert "spf=fail" in header
    assert "dmarc=fail header.from=none.example policy.dmarc=none" in header
    assert (server.spool_path / "ready" / f"{sent.queue_id}.json").exists()
    [row] = await report_rows(server)
    assert (row["disposition"], row["np"], row["sp"]) == ("none", "reject", "none")


async def test_np_reject_refuses_a_non_existent_subdomain(elemta_server, zones):
    server = await start(elemta_server, zones, Results())

    sent = await send_mail(server, "a@example.net", ["user@example.test"],
                           message("boss@nowhere.none.example"))

    assert (sent.reply.code, sent.reply.enhanced) == (550, "5.7.1")
    assert "(np=reject)" in sent.reply.text


async def test_a_domain_without_a_record_gets_dmarc_none(elemta_server, zones):
    zones.zone("plain.example")
    server = await start(elemta_server, zones, Results())

    sent = await send_mail(server, "a@plain.example", ["user@example.test"],
                           message("a@plain.example"))

    assert sent.accepted
    [header] = auth_results_headers(stored(server, sent.queue_id))
    assert 'dmarc=none reason="no DMARC record" header.from=plain.example' in header
    assert await report_rows(server) == []


# ------------------------------------------------------------------ local overrides


async def test_never_reject_quarantines_instead(elemta_server, zones):
    server = await start(elemta_server, zones, Results(), never_reject=True)

    sent = await send_mail(server, "a@example.net", ["user@example.test"],
                           message("boss@reject.example"))

    assert sent.accepted, sent.reply
    server.app.spool.wait_written()
    assert (server.spool_path / "hold" / f"{sent.queue_id}.json").exists()
    [header] = auth_results_headers(stored(server, sent.queue_id))
    assert 'reason="p=reject applied as quarantine (never_reject)"' in header
    [row] = await report_rows(server)
    assert (row["disposition"], row["override"]) == ("quarantine", "local_policy")


async def test_an_exempt_domain_is_annotated_but_not_acted_on(elemta_server, zones):
    server = await start(elemta_server, zones, Results(), exempt_domains=["reject.example"])

    sent = await send_mail(server, "a@example.net", ["user@example.test"],
                           message("boss@reject.example"))

    assert sent.accepted, sent.reply
    [header] = auth_results_headers(stored(server, sent.queue_id))
    assert "dmarc=fail" in header and "exempt_domains" in header


async def test_authenticated_sessions_are_skipped(elemta_server, zones):
    server = await start(elemta_server, zones, Results())

    sent = await send_mail(server, "me@example.test", ["someone@example.test"],
                           message("boss@reject.example"), listener="submission",
                           starttls=True, auth=("me@example.test", "secret"))

    assert sent.accepted, sent.reply
    assert "dmarc=" not in header_block(stored(server, sent.queue_id))
    assert await report_rows(server) == []


async def test_authenticated_sessions_are_checked_when_asked(elemta_server, zones):
    server = await start(elemta_server, zones, Results(), skip_authenticated=False)

    sent = await send_mail(server, "me@example.test", ["someone@example.test"],
                           message("boss@reject.example"), listener="submission",
                           starttls=True, auth=("me@example.test", "secret"))

    assert sent.reply.code == 550


async def test_sessions_a_connect_plugin_lets_relay_are_skipped(elemta_server, zones):
    class Office(Results):
        @hookimpl
        def connect(self, session):
            session.relay_allowed = True

    server = await start(elemta_server, zones, Office())

    sent = await send_mail(server, "a@example.net", ["user@example.test"],
                           message("boss@reject.example"))

    assert sent.accepted, sent.reply


@pytest.mark.parametrize("skip, code", [(True, 250), (False, 550)])
async def test_relay_permitted_sessions_are_skipped_by_default(elemta_server, zones, skip, code):
    server = await start(elemta_server, zones, Results(), skip_relay=skip,
                         extra={"server": {"relay_networks": ["127.0.0.0/8"]}})

    sent = await send_mail(server, "a@example.net", ["user@example.test"],
                           message("boss@reject.example"))

    assert sent.reply.code == code


# ------------------------------------------------------------------ the From: header


@pytest.mark.parametrize("from_", [None, ["a@reject.example", "b@reject.example"],
                                   "a@reject.example, b@none.example", "undisclosed"])
async def test_a_from_without_exactly_one_author_domain_is_refused(elemta_server, zones,
                                                                  from_):
    server = await start(elemta_server, zones, Results())

    sent = await send_mail(server, "a@example.net", ["user@example.test"], message(from_))

    assert (sent.reply.code, sent.reply.enhanced) == (550, "5.7.1"), sent.reply
    assert "exactly one author domain" in sent.reply.text
    assert await metric(server, "smtp_dmarc_results_total", domain="other",
                        result="permerror") == 1.0


async def test_bad_from_evaluate_applies_the_strictest_policy_of_its_domains(elemta_server,
                                                                            zones):
    server = await start(elemta_server, zones, Results(dkim=[("none.example", "pass")]),
                         bad_from="evaluate")

    sent = await send_mail(server, "a@example.net", ["user@example.test"],
                           message("a@none.example, b@reject.example"))

    assert sent.reply.code == 550 and "reject.example" in sent.reply.text


async def test_bad_from_evaluate_annotates_each_domain(elemta_server, zones):
    server = await start(elemta_server, zones, Results(dkim=[("none.example", "pass")]),
                         bad_from="evaluate")

    sent = await send_mail(server, "a@example.net", ["user@example.test"],
                           message("a@none.example, b@quarantine.example"))

    assert sent.accepted
    server.app.spool.wait_written()
    assert (server.spool_path / "hold" / f"{sent.queue_id}.json").exists()
    [header] = auth_results_headers(stored(server, sent.queue_id))
    assert "dmarc=pass header.from=none.example" in header
    assert "dmarc=fail header.from=quarantine.example" in header


async def test_bad_from_evaluate_without_any_from_is_permerror(elemta_server, zones):
    server = await start(elemta_server, zones, Results(), bad_from="evaluate")

    sent = await send_mail(server, "a@example.net", ["user@example.test"], message(None))

    assert sent.accepted
    [header] = auth_results_headers(stored(server, sent.queue_id))
    assert 'dmarc=permerror reason="the message has no From: header field"' in header


# ------------------------------------------------------------------ DNS failures


async def test_a_dns_failure_is_annotated_as_temperror_and_accepted(elemta_server, zones):
    zones.fail("_dmarc.reject.example", "SERVFAIL")
    server = await start(elemta_server, zones, Results(dkim=[("reject.example", "pass")]))

    sent = await send_mail(server, "a@example.net", ["user@example.test"],
                           message("boss@reject.example"))

    assert sent.accepted
    [header] = auth_results_headers(stored(server, sent.queue_id))
    assert "dmarc=temperror" in header and "dmarc=pass" not in header
    assert await metric(server, "smtp_dmarc_results_total", domain="reject.example",
                        result="temperror") == 1.0


async def test_a_dns_failure_is_a_451_with_on_temperror_tempfail(elemta_server, zones):
    zones.fail("_dmarc.reject.example", "timeout")
    server = await start(elemta_server, zones, Results(), on_temperror="tempfail")

    sent = await send_mail(server, "a@example.net", ["user@example.test"],
                           message("boss@reject.example"))

    assert (sent.reply.code, sent.reply.enhanced) == (451, "4.4.3"), sent.reply
    assert "could not be looked up" in sent.reply.text


# ------------------------------------------------------------------ configuration


async def test_report_data_can_be_turned_off(elemta_server, zones):
    server = await start(elemta_server, zones, Results(), reports={"enabled": False})

    sent = await send_mail(server, "a@example.net", ["user@example.test"],
                           message("boss@none.example"))

    assert sent.accepted
    assert not (Path(server.settings.server.state_dir) / "dmarc-reports.sqlite3").exists()


async def test_report_data_goes_to_the_configured_path(elemta_server, zones, tmp_path):
    path = tmp_path / "elsewhere" / "dmarc.db"
    server = await start(elemta_server, zones, Results(), reports={"path": str(path)})

    await send_mail(server, "a@example.net", ["user@example.test"], message("b@none.example"))

    await server.app.pm.get_plugin("dmarc").store.drain()
    assert len(await asyncio.to_thread(read_rows, path)) == 1


async def test_a_misspelled_key_is_a_configuration_error(elemta_server, zones):
    with pytest.raises(ConfigError) as error:
        await start(elemta_server, zones, Results(), never_rejct=True)
    assert "never_rejct" in str(error.value)


async def test_a_missing_public_suffix_list_stops_start_up_with_the_key(elemta_server, zones,
                                                                       tmp_path):
    with pytest.raises(StartupError, match="public_suffix_list"):
        await start(elemta_server, zones, Results(),
                    public_suffix_list=str(tmp_path / "missing.dat"))
