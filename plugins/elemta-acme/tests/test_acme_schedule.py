"""When to renew (threshold, ACME Renewal Information) and when to try again (backoff)."""

from __future__ import annotations

import datetime
import random
import time

import pytest
from cryptography import x509

from elemta_acme.certs import ari_cert_id, cert_info, split_chain
from elemta_acme.renewer import Renewer
from elemta_acme.schedule import (RenewalWindow, backoff_seconds, next_attempt_delay,
                                  parse_renewal_info, parse_retry_after, renewal_time,
                                  threshold_time, time_in_window)
from elemta_acme.settings import AcmeSettings
from elemta_acme.store import Store

from acme_support import make_chain

UTC = datetime.timezone.utc
NOW = datetime.datetime(2025, 6, 1, 12, 0, tzinfo=UTC)


def info_for(days: float, start: datetime.datetime = NOW):
    fullchain, _ = make_chain(["mx.example.test"], days=days, not_before=start)
    return cert_info(split_chain(fullchain)[0])


def test_threshold_is_a_share_of_the_lifetime_left():
    info = info_for(90)
    when, reason = threshold_time(info, 1 / 3, None)
    assert when == info.not_after - datetime.timedelta(days=30)
    assert "renew_share" in reason


def test_threshold_in_days_when_shorter_than_the_lifetime():
    info = info_for(90)
    assert threshold_time(info, 1 / 3, 20)[0] == info.not_after - datetime.timedelta(days=20)
    # six-day certificates with renew_days = 30 would renew forever: the share applies
    short = info_for(6)
    when, reason = threshold_time(short, 1 / 3, 30)
    assert when == short.not_after - datetime.timedelta(days=2)
    assert "not shorter than the certificate's lifetime" in reason


def test_renewal_information_window_is_parsed():
    document = {"suggestedWindow": {"start": "2025-07-01T00:00:00Z",
                                    "end": "2025-07-02T12:30:00.123456789Z"},
                "explanationURL": "https://ca.example/incident/1"}

    window = parse_renewal_info(document, "21600", NOW)

    assert window.start == datetime.datetime(2025, 7, 1, tzinfo=UTC)
    assert window.end == datetime.datetime(2025, 7, 2, 12, 30, 0, 123456, tzinfo=UTC)
    assert window.explanation_url == "https://ca.example/incident/1"
    assert window.recheck_at == NOW + datetime.timedelta(hours=6)
    # no Retry-After: six hours; absurd ones are kept between a minute and a day
    assert parse_renewal_info(document, None, NOW).recheck_at == NOW + datetime.timedelta(hours=6)
    assert parse_renewal_info(document, "1", NOW).recheck_at == NOW + datetime.timedelta(minutes=1)
    assert parse_renewal_info(document, "9999999", NOW).recheck_at == \
        NOW + datetime.timedelta(days=1)


@pytest.mark.parametrize("document,message", [
    ({}, "without a suggestedWindow"),
    ({"suggestedWindow": {"start": "2025-07-02T00:00:00Z", "end": "2025-07-01T00:00:00Z"}},
     "before it starts"),
    ({"suggestedWindow": {"start": "yesterday", "end": "2025-07-01T00:00:00Z"}},
     "not an RFC 3339 timestamp"),
    ({"suggestedWindow": {"start": "2025-07-01T00:00:00", "end": "2025-07-02T00:00:00"}},
     "no time zone"),
])
def test_malformed_renewal_information_is_refused(document, message):
    with pytest.raises(ValueError, match=message):
        parse_renewal_info(document, None, NOW)


def test_the_renewal_time_is_random_in_the_window_or_now_once_it_opened():
    window = RenewalWindow(NOW + datetime.timedelta(days=1), NOW + datetime.timedelta(days=2),
                           None, NOW)
    rng = random.Random(7)
    times = [time_in_window(window, NOW, rng) for _ in range(200)]
    assert all(window.start <= t <= window.end for t in times)
    assert max(times) - min(times) > datetime.timedelta(hours=18)       # spread out
    opened = RenewalWindow(NOW - datetime.timedelta(hours=1), NOW + datetime.timedelta(days=1),
                           None, NOW)
    assert time_in_window(opened, NOW) == NOW


def test_the_ca_window_overrides_the_threshold_unless_it_ends_after_expiry():
    info = info_for(90)
    inside = RenewalWindow(info.not_after - datetime.timedelta(days=5),
                           info.not_after - datetime.timedelta(days=4), None, NOW)
    chosen = inside.start + datetime.timedelta(hours=3)
    when, reason = renewal_time(info, 1 / 3, None, inside, chosen)
    assert when == chosen and "(ARI)" in reason
    beyond = RenewalWindow(info.not_after, info.not_after + datetime.timedelta(days=1), None, NOW)
    assert renewal_time(info, 1 / 3, None, beyond, beyond.start)[0] == \
        threshold_time(info, 1 / 3, None)[0]
    assert renewal_time(info, 1 / 3, None, None, None) == threshold_time(info, 1 / 3, None)


def test_ari_certificate_identifier_is_aki_dot_serial():
    fullchain, _ = make_chain(["mx.example.test"])
    leaf = split_chain(fullchain)[0]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ident = ari_cert_id(leaf)
    left, right = ident.split(".")
    import base64

    assert base64.urlsafe_b64decode(left + "==") == aki.key_identifier
    serial = int.from_bytes(base64.urlsafe_b64decode(right + "=" * (-len(right) % 4)), "big",
                            signed=True)
    assert serial == leaf.serial_number and "=" not in ident


def test_backoff_doubles_with_jitter_and_is_capped():
    rng = random.Random(1)
    for failures in range(1, 12):
        base = min(3600, 60 * 2 ** (failures - 1))
        for _ in range(20):
            delay = backoff_seconds(failures, 60, 3600, rng)
            assert base / 2 <= delay <= base
    assert backoff_seconds(0, 60, 3600) == 0
    assert backoff_seconds(10_000, 60, 3600) <= 3600


def test_what_the_ca_asks_for_is_waited_when_longer_than_the_backoff():
    assert next_attempt_delay(1, 60, 3600, 7200.0, random.Random(1)) == 7200
    assert 30 <= next_attempt_delay(1, 60, 3600, 5.0, random.Random(1)) <= 60
    assert parse_retry_after("120", NOW) == 120
    http_date = "Sun, 01 Jun 2025 13:00:00 GMT"
    assert parse_retry_after(http_date, NOW) == 3600
    assert parse_retry_after("soon", NOW) is None


async def test_a_stored_renewal_window_decides_without_asking_the_ca(tmp_path):
    """The ARI window a server learnt (kept in status.json) drives the decision: due once
    the time chosen in it has come, even though the share threshold is far away."""
    store = Store(tmp_path / "acme")
    store.ensure()
    fullchain, key = make_chain(["mx.example.test"], days=90)
    current = store.install(key, fullchain)
    settings = AcmeSettings(names=["mx.example.test"], directory="https://127.0.0.1:9/dir")
    renewer = Renewer(settings, store)
    await renewer.refresh()
    now = time.time()

    def remember(chosen: float) -> None:
        store.update_status(lambda s: s.update(ari={
            "serial": current.info.serial_hex, "offered": True, "start": now - 3600,
            "end": now + 86400, "chosen": chosen, "explanation_url": None,
            "recheck_at": now + 3600}))

    remember(now + 600)
    due, when, reason = await renewer.due(store.read_status())
    assert not due and "(ARI)" in reason
    assert when == pytest.approx(now + 600, abs=1e-3)
    assert store.read_status()["renew_at"] == pytest.approx(now + 600, abs=1e-3)

    remember(now - 1)
    due, _, reason = await renewer.due(store.read_status())
    assert due and "renewal window" in reason
