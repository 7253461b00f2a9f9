"""The chunked body canonicalization gives exactly dkimpy's bytes, however it is cut."""

from __future__ import annotations

import hashlib
import io

import dkim
import pytest
from dkim.canonicalization import Relaxed, Simple
from hypothesis import given, settings
from hypothesis import strategies as st

from elemta_dkim.canon import (MAX_HEADER_BYTES, BodyCanonicalizer, BodyHashSpec, HeaderTooLarge,
                               body_hashes, read_header_section)

PIECES = [b"a", b"word", b" ", b"  ", b"\t", b" \t ", b"\r\n", b"\n", b"\r", b"\r\r\n", b"."]


def chunked(body: bytes, relaxed: bool, sizes: list[int]) -> bytes:
    canon = BodyCanonicalizer(relaxed)
    out, i, k = b"", 0, 0
    while i < len(body):
        size = sizes[k % len(sizes)]
        out += canon.feed(body[i:i + size])
        i, k = i + size, k + 1
    return out + canon.finish()


def dkimpy(body: bytes, relaxed: bool) -> bytes:
    _, parsed = dkim.rfc822_parse(b"From: a@example.com\r\n\r\n" + body)
    return (Relaxed if relaxed else Simple).canonicalize_body(parsed)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(PIECES), max_size=40), st.booleans(),
       st.lists(st.integers(1, 9), min_size=1, max_size=5))
def test_chunked_canonicalization_is_dkimpys(pieces, relaxed, sizes):
    body = b"".join(pieces)
    assert chunked(body, relaxed, sizes) == dkimpy(body, relaxed)


@pytest.mark.parametrize("body, simple, relaxed", [
    (b"", b"\r\n", b""),
    (b"\r\n\r\n\r\n", b"\r\n", b""),
    (b"x  \r\n\r\n", b"x  \r\n", b"x\r\n"),
    (b"x", b"x\r\n", b"x\r\n"),
    (b" a \t b \r\n\r\nc\r\n\r\n", b" a \t b \r\n\r\nc\r\n", b" a b\r\n\r\nc\r\n"),
])
def test_rfc_6376_examples(body, simple, relaxed):
    assert chunked(body, False, [3]) == simple
    assert chunked(body, True, [3]) == relaxed


def test_one_pass_gives_every_hash_and_l_limits_what_is_hashed():
    body = b"Hello  world \r\n\r\nsecond line\r\n\r\n"
    specs = [BodyHashSpec(False, "sha256", None), BodyHashSpec(True, "sha256", None),
             BodyHashSpec(True, "sha1", None), BodyHashSpec(True, "sha256", 5)]
    out = body_hashes(io.BytesIO(body), specs, chunk_bytes=4)
    canonical = dkimpy(body, True)
    assert out[specs[0]].digest == hashlib.sha256(dkimpy(body, False)).digest()
    assert out[specs[1]].digest == hashlib.sha256(canonical).digest()
    assert out[specs[2]].digest == hashlib.sha1(canonical).digest()
    assert out[specs[3]].digest == hashlib.sha256(canonical[:5]).digest()
    assert out[specs[3]].hashed == 5 and out[specs[3]].total == len(canonical)


def test_the_header_section_ends_at_the_first_empty_line():
    f = io.BytesIO(b"A: 1\r\n folded\r\nB: 2\r\n\r\nbody\r\n\r\nmore\r\n")
    assert read_header_section(f) == b"A: 1\r\n folded\r\nB: 2\r\n\r\n"
    assert f.read() == b"body\r\n\r\nmore\r\n"
    assert read_header_section(io.BytesIO(b"A: 1\nB: 2\n\nbody")) == b"A: 1\nB: 2\n\n"
    assert read_header_section(io.BytesIO(b"A: 1\r\n")) == b"A: 1\r\n"


def test_a_huge_header_section_is_refused_not_read_whole():
    f = io.BytesIO(b"X: " + b"y" * (MAX_HEADER_BYTES + 10) + b"\r\n\r\n")
    with pytest.raises(HeaderTooLarge):
        read_header_section(f)
