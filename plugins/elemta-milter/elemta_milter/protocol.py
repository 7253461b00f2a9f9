"""The milter protocol, version 6, as the MTA speaks it: constants and a pure codec.

Every packet is a 32-bit length in network byte order, then one command (or reply)
byte, then ``length - 1`` bytes of data. The constants and formats follow Sendmail's
``include/libmilter/mfdef.h`` and ``sendmail/milter.c`` (the MTA side of libmilter);
nothing here does I/O, so it is tested on its own and reused by :mod:`.client`.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

VERSION = 6                 # SMFI_PROT_VERSION
CHUNK_SIZE = 65535          # MILTER_CHUNK_SIZE: the largest body chunk an MTA sends
MAX_REPLY_SIZE = 1 << 20    # the largest reply accepted (SMFIP_MDS_1M); beyond it: garbage

# ---------------------------------------------------------------- commands (MTA → milter)
ABORT = b"A"
BODY = b"B"
CONNECT = b"C"
MACRO = b"D"
BODYEOB = b"E"
HELO = b"H"
QUIT_NC = b"K"
HEADER = b"L"
MAIL = b"M"
EOH = b"N"
OPTNEG = b"O"
QUIT = b"Q"
RCPT = b"R"
DATA = b"T"
UNKNOWN = b"U"

# ---------------------------------------------------------------- replies (milter → MTA)
ADDRCPT = b"+"
DELRCPT = b"-"
ADDRCPT_PAR = b"2"
SHUTDOWN = b"4"
ACCEPT = b"a"
REPLBODY = b"b"
CONTINUE = b"c"
DISCARD = b"d"
CHGFROM = b"e"
CONN_FAIL = b"f"
ADDHEADER = b"h"
INSHEADER = b"i"
SETSYMLIST = b"l"
CHGHEADER = b"m"
PROGRESS = b"p"
QUARANTINE = b"q"
REJECT = b"r"
SKIP = b"s"
TEMPFAIL = b"t"
REPLYCODE = b"y"

REPLY_NAMES = {
    ADDRCPT: "addrcpt", DELRCPT: "delrcpt", ADDRCPT_PAR: "addrcpt_par", SHUTDOWN: "shutdown",
    ACCEPT: "accept", REPLBODY: "replbody", CONTINUE: "continue", DISCARD: "discard",
    CHGFROM: "chgfrom", CONN_FAIL: "conn_fail", ADDHEADER: "addheader",
    INSHEADER: "insheader", SETSYMLIST: "setsymlist", CHGHEADER: "chgheader",
    PROGRESS: "progress", QUARANTINE: "quarantine", REJECT: "reject", SKIP: "skip",
    TEMPFAIL: "tempfail", REPLYCODE: "replycode",
}
# the replies that may only come after SMFIC_BODYEOB (the message modifications)
MODIFICATIONS = frozenset({ADDRCPT, DELRCPT, ADDRCPT_PAR, REPLBODY, CHGFROM, ADDHEADER,
                           INSHEADER, CHGHEADER, QUARANTINE})

# ---------------------------------------------------------------- address families
FAMILY_UNKNOWN = b"U"
FAMILY_UNIX = b"L"
FAMILY_INET = b"4"
FAMILY_INET6 = b"6"

# ---------------------------------------------------------------- actions (SMFIF_*)
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40
SMFIF_ADDRCPT_PAR = 0x80
SMFIF_SETSYMLIST = 0x100
ACTIONS_OFFERED = 0x1FF     # every action above

# ---------------------------------------------------------------- protocol steps (SMFIP_*)
SMFIP_NOCONNECT = 0x01
SMFIP_NOHELO = 0x02
SMFIP_NOMAIL = 0x04
SMFIP_NORCPT = 0x08
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000
SMFIP_MDS_256K = 0x10000000
SMFIP_MDS_1M = 0x20000000
# Everything but SMFIP_RCPT_REJ: Elemta never shows a milter a recipient it refused.
# A milter that asks for it anyway simply does not see refused recipients.
PROTOCOL_OFFERED = 0x1FFFFF & ~SMFIP_RCPT_REJ

# ---------------------------------------------------------------- macro stages (SMFIM_*)
STAGE_CONNECT = 0
STAGE_HELO = 1
STAGE_MAIL = 2
STAGE_RCPT = 3
STAGE_DATA = 4
STAGE_EOM = 5
STAGE_EOH = 6
STAGE_NAMES = {STAGE_CONNECT: "connect", STAGE_HELO: "helo", STAGE_MAIL: "mail",
               STAGE_RCPT: "rcpt", STAGE_DATA: "data", STAGE_EOM: "eom", STAGE_EOH: "eoh"}
# the command whose SMFIC_MACRO packet carries a stage's macros
STAGE_COMMAND = {STAGE_CONNECT: CONNECT, STAGE_HELO: HELO, STAGE_MAIL: MAIL,
                 STAGE_RCPT: RCPT, STAGE_DATA: DATA, STAGE_EOM: BODYEOB, STAGE_EOH: EOH}


class ProtocolError(Exception):
    """A milter sent something that is not the milter protocol (or not at this point)."""


# ---------------------------------------------------------------- encoding


def packet(command: bytes, data: bytes = b"") -> bytes:
    """One packet: length (command byte included), command, data."""
    return struct.pack("!I", len(data) + 1) + command + data


def _z(text: str) -> bytes:
    """A NUL-terminated string, as every string field of the protocol is."""
    raw = text.encode("utf-8", "surrogateescape")
    if b"\0" in raw:
        raise ValueError(f"{text!r} contains a NUL byte, which the milter protocol cannot carry")
    return raw + b"\0"


def optneg(version: int = VERSION, actions: int = ACTIONS_OFFERED,
           protocol: int = PROTOCOL_OFFERED) -> bytes:
    return packet(OPTNEG, struct.pack("!III", version, actions, protocol))


def macros(command: bytes, values: list[tuple[str, str]]) -> bytes:
    """SMFIC_MACRO: the command the macros belong to, then name/value pairs."""
    return packet(MACRO, command + b"".join(_z(n) + _z(v) for n, v in values))


def connect(hostname: str, family: bytes, port: int = 0, address: str = "") -> bytes:
    """SMFIC_CONNECT: host name, family, port (network order) and address or socket path."""
    data = _z(hostname) + family
    if family != FAMILY_UNKNOWN:
        data += struct.pack("!H", port) + _z(address)
    return packet(CONNECT, data)


def helo(name: str) -> bytes:
    return packet(HELO, _z(name))


def envelope(command: bytes, address: str, params: dict[str, str | None]) -> bytes:
    """SMFIC_MAIL or SMFIC_RCPT: ``<address>`` then each ESMTP argument, as Sendmail sends."""
    args = [f"<{address}>"] + [k if v is None else f"{k}={v}" for k, v in params.items()]
    return packet(command, b"".join(_z(a) for a in args))


def header(name: str, value: str) -> bytes:
    return packet(HEADER, _z(name) + _z(value))


def body(chunk: bytes) -> bytes:
    if len(chunk) > CHUNK_SIZE:
        raise ValueError(f"a body chunk is at most {CHUNK_SIZE} bytes, got {len(chunk)}")
    return packet(BODY, chunk)


# ---------------------------------------------------------------- decoding


@dataclass(frozen=True)
class Negotiated:
    """What a milter answered to SMFIC_OPTNEG."""

    version: int
    actions: int
    protocol: int
    # macro stage → the macro names the milter asked for (SMFIR_SETSYMLIST data)
    symbols: dict[int, tuple[str, ...]] = field(default_factory=dict)
    # bits the milter asked for that were not offered (ignored, reported once)
    ignored_actions: int = 0
    ignored_protocol: int = 0

    def has(self, flag: int) -> bool:
        return bool(self.protocol & flag)


def parse_optneg(data: bytes) -> Negotiated:
    """The milter's SMFIC_OPTNEG reply, checked as Sendmail checks it.

    A version of 1 or above 6 is refused. Protocol versions 2 and 3 imply
    SMFIP_NOUNKNOWN and SMFIP_NODATA (those commands did not exist yet). Action and
    step bits that were not offered are dropped (and reported in ``ignored_*``) rather
    than failing every session; the size bits (SMFIP_MDS_*) are dropped silently: the
    MTA decides chunk sizes and sends at most 65535 bytes.
    """
    if len(data) < 12:
        raise ProtocolError(f"the option negotiation reply has {len(data)} bytes of data, "
                            "not the 12 of version, actions and protocol")
    version, actions, protocol = struct.unpack("!III", data[:12])
    if version < 2 or version > VERSION:
        raise ProtocolError(f"the milter speaks protocol version {version}; this client "
                            f"speaks versions 2 to {VERSION}")
    protocol &= ~(SMFIP_MDS_256K | SMFIP_MDS_1M)
    ignored_actions = actions & ~ACTIONS_OFFERED
    ignored_protocol = protocol & ~PROTOCOL_OFFERED
    actions &= ACTIONS_OFFERED
    protocol &= PROTOCOL_OFFERED
    if version <= 2:
        protocol |= SMFIP_NOUNKNOWN
    if version <= 3:
        protocol |= SMFIP_NODATA
    return Negotiated(version, actions, protocol, parse_symlists(data[12:]),
                      ignored_actions, ignored_protocol)


def parse_symlists(data: bytes) -> dict[int, tuple[str, ...]]:
    """The macro lists after the negotiation data: (stage, "name name …\\0") repeated."""
    out: dict[int, tuple[str, ...]] = {}
    pos = 0
    while pos < len(data):
        if len(data) - pos < 5:
            raise ProtocolError("a macro list (SMFIR_SETSYMLIST) is cut short")
        (stage,) = struct.unpack("!I", data[pos:pos + 4])
        if stage not in STAGE_NAMES:
            raise ProtocolError(f"a macro list names protocol stage {stage}, which does "
                                "not exist (0 to 6)")
        end = data.find(b"\0", pos + 4)
        if end < 0:
            raise ProtocolError("a macro list (SMFIR_SETSYMLIST) is not NUL-terminated")
        names = data[pos + 4:end].decode("ascii", "replace").split()
        out[stage] = tuple(canonical_macro(n) for n in names)
        pos = end + 1
    return out


def canonical_macro(name: str) -> str:
    """``i`` and ``{i}`` name the same macro: one-letter names bare, others in braces."""
    bare = name.strip("{}")
    return bare if len(bare) == 1 else "{" + bare + "}"


def strings(data: bytes, what: str, minimum: int = 1, maximum: int | None = None) -> list[str]:
    """The NUL-terminated strings of a reply (the last NUL is required)."""
    if not data.endswith(b"\0"):
        raise ProtocolError(f"the {what} reply is not NUL-terminated")
    parts = [p.decode("utf-8", "surrogateescape") for p in data[:-1].split(b"\0")]
    if len(parts) < minimum or (maximum is not None and len(parts) > maximum):
        raise ProtocolError(f"the {what} reply has {len(parts)} fields")
    return parts


def header_edit(data: bytes, indexed: bool, what: str) -> tuple[int, str, str]:
    """SMFIR_ADDHEADER (``name\\0value\\0``), or SMFIR_INSHEADER and SMFIR_CHGHEADER
    (a 32-bit index first)."""
    index = 0
    if indexed:
        if len(data) < 4:
            raise ProtocolError(f"the {what} reply is too short for its index")
        (index,) = struct.unpack("!I", data[:4])
        data = data[4:]
    name, value = strings(data, what, 2, 2)
    if not name:
        raise ProtocolError(f"the {what} reply has an empty header name")
    return index, name, value


def address_edit(data: bytes, what: str, with_args: bool) -> tuple[str, dict[str, str | None]]:
    """SMFIR_ADDRCPT/DELRCPT (``address\\0``), SMFIR_ADDRCPT_PAR and SMFIR_CHGFROM
    (``address\\0[args\\0]``, the arguments separated by spaces)."""
    parts = strings(data, what, 1, 2 if with_args else 1)
    address = parts[0].strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    params: dict[str, str | None] = {}
    if len(parts) == 2:
        for arg in parts[1].split():
            key, sep, value = arg.partition("=")
            params[key.upper()] = value if sep else None
    return address, params


_REPLY_LINE = re.compile(r"([45]\d\d)([ -]|$)(?:([45]\.\d{1,3}\.\d{1,3})(?: |$))?(.*)", re.S)


@dataclass(frozen=True)
class ReplyCode:
    """A custom SMTP reply from SMFIR_REPLYCODE, folded to one line."""

    code: int
    enhanced: str
    text: str


def parse_replycode(data: bytes, default_text: str) -> ReplyCode | None:
    """``NNN x.y.z text``, possibly multi-line (``NNN-x.y.z line\\r\\n…``); ``None`` when
    malformed (Sendmail then answers its default reply).

    Elemta's replies are one line, so the lines of a multi-line reply are joined with
    a space. ``%%`` (how libmilter's smfi_setreply writes a percent sign) becomes ``%``.
    A missing enhanced status code, or one of the wrong class, becomes ``x.7.1``.
    """
    text = data.rstrip(b"\0").decode("utf-8", "replace")
    lines = [line for line in re.split(r"\r?\n", text) if line]
    if not lines:
        return None
    code = None
    enhanced = None
    texts = []
    for line in lines:
        m = _REPLY_LINE.match(line)
        if m is None:
            return None
        if code is None:
            code, enhanced = int(m.group(1)), m.group(3)
        texts.append(m.group(4).strip())
    assert code is not None
    first = str(code)[0]
    if enhanced is None or enhanced[0] != first:
        enhanced = f"{first}.7.1"
    joined = " ".join(t for t in texts if t).replace("%%", "%")
    joined = "".join(c if c.isprintable() else " " for c in joined).strip()
    return ReplyCode(code, enhanced, joined or default_text)
