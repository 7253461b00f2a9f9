"""``elemta.new_id``: queue and session identifiers."""

from __future__ import annotations

import os
import threading
import time

from elemta import new_id
from elemta.models import _ALPHABET


def _decode(ident: str) -> int:
    n = 0
    for c in ident:
        n = n * 32 + _ALPHABET.index(c)
    return n


def test_identifiers_are_unique_time_ordered_and_carry_the_time():
    before = time.time_ns() // 1000
    ids = [new_id() for _ in range(3000)]   # more than one pool of random bits
    after = time.time_ns() // 1000
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 20 and set(i) <= set(_ALPHABET) for i in ids)
    stamps = [_decode(i) >> 40 for i in ids]
    assert before <= stamps[0] and stamps[-1] <= after + len(ids)
    # the random part is not all the same
    assert len({_decode(i) & (2**40 - 1) for i in ids}) == len(ids)


def test_identifiers_made_in_threads_are_unique():
    out: list[list[str]] = [[] for _ in range(4)]

    def make(i: int) -> None:
        out[i].extend(new_id() for _ in range(2000))

    threads = [threading.Thread(target=make, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [i for part in out for i in part]
    assert len(set(everything)) == 8000


def test_a_forked_child_does_not_repeat_its_parents_random_bits():
    new_id()  # the parent has a pool of random bits
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(w, "".join(new_id() for _ in range(10)).encode())
        finally:
            os._exit(0)
    os.close(w)
    mine = [new_id() for _ in range(10)]
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        raw = f.read().decode()
    theirs = [raw[i:i + 20] for i in range(0, len(raw), 20)]
    assert len(theirs) == 10
    random_bits = {_decode(i) & (2**40 - 1) for i in mine}
    assert not random_bits & {_decode(i) & (2**40 - 1) for i in theirs}
