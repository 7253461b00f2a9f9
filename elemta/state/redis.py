"""The Redis state store: shared by every node that points at the same Redis.

Each operation is one command or one Lua script, so it is atomic on the
Redis server, and time comes from the server (``TIME``), so nodes whose
clocks differ still agree. Values are plain keys with a TTL; a rate is a key
holding its GCRA time (its TTL the moment it would be idle again); the leases
of a key are a sorted set of holders scored by their expiry. Connection
failures and time-outs are :class:`~elemta.state.StateUnavailable`.
"""

from __future__ import annotations

import math
import ssl
from pathlib import Path
from typing import Any, Sequence

from . import StateEntry, Rate, StateUnavailable

MAX_CONNECTIONS = 32

# KEYS: the rate keys; ARGV: cost, then limit and period (s) of each key. The same
# arithmetic as elemta.state.gcra; all or none: when one key refuses, none is written.
_RATES = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cost = tonumber(ARGV[1])
local answers, news, ok = {}, {}, true
for i, key in ipairs(KEYS) do
  local limit, period = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local interval = period / limit
  local tat = tonumber(redis.call('GET', key))
  local base = now
  if tat ~= nil and tat > now then base = tat end
  local new
  if cost < 0 then
    new = math.max(now, base + cost * interval)
  else
    new = base + cost * interval
  end
  local allow_at = new - period
  if cost >= 0 and now < allow_at - 1e-9 then
    ok = false
    local remaining = math.max(0, math.floor((period - (base - now)) / interval + 1e-9))
    answers[i] = {0, remaining, tostring(allow_at - now)}
  else
    answers[i] = {1, math.floor((period - (new - now)) / interval + 1e-9), '0'}
    news[i] = new
  end
end
if ok then
  for i, key in ipairs(KEYS) do
    local new = news[i]
    if new <= now then
      redis.call('DEL', key)
    else
      redis.call('SET', key, string.format('%.6f', new), 'PX', math.ceil((new - now) * 1000))
    end
  end
end
return answers
"""

# KEYS[1] the lease set; ARGV: holder, limit, ttl (s)
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == false then
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
end
local expires = now + tonumber(ARGV[3])
redis.call('ZADD', KEYS[1], expires, ARGV[1])
redis.call('PEXPIREAT', KEYS[1], math.ceil(redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2] * 1000))
return 1
"""

# KEYS[1] the counter; ARGV: by, ttl (ms)
_INCR = """
local v = redis.call('INCRBY', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return v
"""


class RedisStore:
    """:class:`~elemta.state.StateStore` on Redis (redis-py's asyncio client)."""

    def __init__(self, url: str, *, password: str | None = None, ca_file: Path | None = None,
                 prefix: str = "elemta:", timeout: float = 1.0) -> None:
        self.url = url
        self.password = password
        self.ca_file = ca_file
        self.prefix = prefix
        self.timeout = timeout
        self._client: Any = None
        self._scripts: dict[str, Any] = {}

    def _redis(self) -> Any:
        if self._client is None:
            import redis.asyncio

            kwargs: dict[str, Any] = {"socket_timeout": self.timeout,
                                      "socket_connect_timeout": self.timeout,
                                      "decode_responses": True, "retry_on_timeout": False}
            if self.password is not None:
                kwargs["password"] = self.password
            if self.url.startswith("rediss://"):
                kwargs["ssl_cert_reqs"] = ssl.CERT_REQUIRED
                if self.ca_file is not None:
                    kwargs["ssl_ca_certs"] = str(self.ca_file)
            # a bounded pool: callers beyond it wait for a connection (at most the
            # time-out) instead of opening connections without end
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                self.url, max_connections=MAX_CONNECTIONS, timeout=self.timeout, **kwargs)
            self._client = redis.asyncio.Redis(connection_pool=pool)
            self._scripts = {name: self._client.register_script(code) for name, code in
                             (("rates", _RATES), ("acquire", _ACQUIRE), ("incr", _INCR))}
        return self._client

    async def _do(self, call: Any) -> Any:
        import redis.exceptions

        try:
            return await call
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as e:
            raise StateUnavailable(f"Redis {_where(self.url)}: {e}") from None
        except redis.exceptions.RedisError as e:
            raise StateUnavailable(f"Redis {_where(self.url)}: {type(e).__name__}: {e}"
                                   ) from None

    def _key(self, key: str) -> str:
        return self.prefix + key

    async def open(self) -> None:
        await self._do(self._redis().ping())

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            try:
                await client.aclose(close_connection_pool=True)
            except Exception:
                pass

    async def rate(self, key: str, limit: int, period: float, cost: int = 1) -> Rate:
        return (await self.rates([(key, limit, period)], cost))[0]

    async def rates(self, items: Sequence[tuple[str, int, float]], cost: int = 1) -> list[Rate]:
        self._redis()
        args: list[Any] = [cost]
        for _, limit, period in items:
            args += [limit, period]
        answers = await self._do(self._scripts["rates"](
            keys=[self._key(k) for k, _, _ in items], args=args))
        return [Rate(bool(int(a)), int(r), float(t)) for a, r, t in answers]

    async def acquire(self, key: str, holder: str, limit: int, ttl: float) -> bool:
        self._redis()
        return bool(int(await self._do(
            self._scripts["acquire"](keys=[self._key(key)], args=[holder, limit, ttl]))))

    async def release(self, key: str, holder: str) -> None:
        await self._do(self._redis().zrem(self._key(key), holder))

    async def get(self, key: str) -> str | None:
        return await self._do(self._redis().get(self._key(key)))

    async def get_many(self, keys: Sequence[str]) -> list[str | None]:
        if not keys:
            return []
        return list(await self._do(self._redis().mget([self._key(k) for k in keys])))

    async def put(self, key: str, value: str, ttl: float) -> None:
        await self._do(self._redis().set(self._key(key), value, px=_ms(ttl)))

    async def add(self, key: str, value: str, ttl: float) -> bool:
        return bool(await self._do(self._redis().set(self._key(key), value, px=_ms(ttl),
                                                     nx=True)))

    async def incr(self, key: str, ttl: float, by: int = 1) -> int:
        self._redis()
        return int(await self._do(
            self._scripts["incr"](keys=[self._key(key)], args=[by, _ms(ttl)])))

    async def delete(self, key: str) -> bool:
        return bool(await self._do(self._redis().delete(self._key(key))))

    async def scan(self, prefix: str, limit: int = 1000) -> list[StateEntry]:
        client = self._redis()
        cut = len(self.prefix)
        out: list[StateEntry] = []

        async def collect() -> None:
            async for k in client.scan_iter(match=_glob(self._key(prefix)) + "*", count=500):
                if len(out) >= limit:
                    break
                kind = await client.type(k)
                if kind == "string":        # a value, a counter or a rate's GCRA time
                    value, ttl = await client.get(k), await client.pttl(k)
                    if value is None:
                        continue
                    out.append(StateEntry(k[cut:], value, ttl / 1000 if ttl >= 0 else None))
                elif kind == "zset":        # leases: how many are held
                    now = float((await client.time())[0])
                    held = await client.zcount(k, f"({now}", "+inf")
                    if held:
                        out.append(StateEntry(k[cut:], str(held), None))

        await self._do(collect())
        return sorted(out, key=lambda e: e.key)

    async def clear(self, prefix: str) -> int:
        client = self._redis()

        async def run() -> int:
            n = 0
            batch: list[str] = []
            async for k in client.scan_iter(match=_glob(self._key(prefix)) + "*", count=500):
                batch.append(k)
                if len(batch) >= 500:
                    n += await client.delete(*batch)
                    batch.clear()
            if batch:
                n += await client.delete(*batch)
            return n

        return await self._do(run())


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _glob(text: str) -> str:
    """``text`` with Redis glob characters escaped."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _where(url: str) -> str:
    """The URL without a password in it, for messages."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = rest.rpartition("@")[2]
    return f"{scheme}{sep}{rest}"
