"""Calling hook implementations: order, await, timeouts, failures.

pluggy only calls functions, and ``firstresult`` cannot await coroutines, so the
core walks ``get_hookimpls()`` itself. Order is the ``[plugins] enabled`` list,
then built-ins (which are ``trylast``). A plugin that raises, times out or
answers with a value its stage does not allow raises :class:`HookFailure`, which
the SMTP layer turns into ``451 4.3.0``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any, Callable, Iterable, Sequence

import pluggy

log = logging.getLogger("elemta.hooks")


class HookFailure(Exception):
    """A plugin failed in a hook; the stage must answer a temporary failure."""

    def __init__(self, hook: str, plugin: str, reason: str) -> None:
        self.hook = hook
        self.plugin = plugin
        self.reason = reason
        super().__init__(f"plugin {plugin} failed in hook {hook}: {reason}")


class Impl:
    """One implementation, ready to call: its function, argument names, plugin name."""

    __slots__ = ("plugin", "function", "argnames", "is_async", "timeout", "observe")

    def __init__(self, hookimpl: pluggy.HookImpl, timeout: float,
                 observe: Callable[[float], None] | None) -> None:
        self.plugin = hookimpl.plugin_name
        self.function = hookimpl.function
        self.argnames = tuple(hookimpl.argnames)
        self.is_async = inspect.iscoroutinefunction(hookimpl.function)
        self.timeout = timeout
        self.observe = observe


Check = Callable[[Any], bool]


class HookCaller:
    """Dispatches hooks of one plugin manager; build it once, after plugins are loaded."""

    def __init__(self, pm: pluggy.PluginManager, order: Sequence[str],
                 timeout_for: Callable[[str], float],
                 histogram: Any | None = None,
                 hook_minimum_seconds: dict[str, float] | None = None) -> None:
        self.pm = pm
        # a hook whose work has its own limits (deliver: connect, DATA…) gets at least this
        self._hook_minimum = hook_minimum_seconds or {}
        self._rank = {name: i for i, name in enumerate(order)}
        self._timeout_for = timeout_for
        self._histogram = histogram
        self._cache: dict[str, tuple[Impl, ...]] = {}

    def impls(self, hook: str) -> tuple[Impl, ...]:
        """The implementations of ``hook`` in call order."""
        cached = self._cache.get(hook)
        if cached is not None:
            return cached
        caller = getattr(self.pm.hook, hook)
        found = [i for i in caller.get_hookimpls() if not (i.wrapper or i.hookwrapper)]
        last = len(self._rank)

        def key(i: pluggy.HookImpl) -> tuple[int, int]:
            tier = -1 if i.tryfirst else 1 if i.trylast else 0
            return tier, self._rank.get(i.plugin_name, last)

        impls = []
        for i in sorted(found, key=key):
            observe = None
            if self._histogram is not None:
                observe = self._histogram.labels(hook=hook, plugin=i.plugin_name).observe
            timeout = max(self._timeout_for(i.plugin_name), self._hook_minimum.get(hook, 0.0))
            impls.append(Impl(i, timeout, observe))
        result = tuple(impls)
        self._cache[hook] = result
        return result

    def _call_sync(self, hook: str, impl: Impl, kwargs: dict[str, Any]) -> Any:
        """Call an implementation; a plain ``def`` (most built-ins) needs no coroutine.

        Its duration is observed here, unless it returned an awaitable: then
        :meth:`_await` observes the whole call, once.
        """
        start = time.perf_counter()
        result: Any = None
        try:
            result = impl.function(*[kwargs[a] for a in impl.argnames])
            return result
        except Exception as e:
            raise self._raised(hook, impl, e) from e
        finally:
            if impl.observe is not None and not inspect.isawaitable(result):
                impl.observe(time.perf_counter() - start)

    async def _await(self, hook: str, impl: Impl, awaitable: Any) -> Any:
        """Await an implementation's result under its timeout."""
        start = time.perf_counter()
        try:
            async with asyncio.timeout(impl.timeout):
                return await awaitable
        except TimeoutError:
            log.error("plugin %s timed out in hook %s after %.1fs", impl.plugin, hook,
                      impl.timeout)
            raise HookFailure(hook, impl.plugin, f"timed out after {impl.timeout:g}s") from None
        except asyncio.CancelledError:
            raise
        except Exception as e:
            raise self._raised(hook, impl, e) from e
        finally:
            if impl.observe is not None:
                impl.observe(time.perf_counter() - start)

    async def _call(self, hook: str, impl: Impl, kwargs: dict[str, Any]) -> Any:
        result = self._call_sync(hook, impl, kwargs)
        if impl.is_async or inspect.isawaitable(result):
            return await self._await(hook, impl, result)
        return result

    def _raised(self, hook: str, impl: Impl, e: Exception) -> HookFailure:
        log.error("plugin %s raised in hook %s: %s: %s", impl.plugin, hook,
                  type(e).__name__, e, exc_info=e)
        return HookFailure(hook, impl.plugin, f"{type(e).__name__}: {e}")

    def _bad_type(self, hook: str, impl: Impl, result: Any, allowed: str) -> HookFailure:
        log.error("plugin %s returned %r from hook %s; allowed: %s", impl.plugin, result,
                  hook, allowed)
        return HookFailure(hook, impl.plugin, f"returned {type(result).__name__}, "
                           f"allowed: {allowed}")

    async def first(self, hook: str, allowed: tuple[type, ...],
                    **kwargs: Any) -> tuple[str | None, Any]:
        """First verdict (or answer) wins: ``(plugin, result)``, or ``(None, None)``."""
        for impl in self.impls(hook):
            result = self._call_sync(hook, impl, kwargs)
            if impl.is_async or inspect.isawaitable(result):
                result = await self._await(hook, impl, result)
            if result is None:
                continue
            if not isinstance(result, allowed):
                raise self._bad_type(hook, impl, result,
                                     " or ".join(t.__name__ for t in allowed) + " or None")
            return impl.plugin, result
        return None, None

    async def collect(self, hook: str, allowed: tuple[type, ...],
                      concurrent: bool = False, **kwargs: Any) -> list[tuple[str, Any]]:
        """Collect all non-``None`` results; lists are flattened and each item checked."""
        impls = self.impls(hook)
        if concurrent and len(impls) > 1:
            results = await asyncio.gather(*(self._call(hook, i, kwargs) for i in impls),
                                           return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        else:
            results = [await self._call(hook, i, kwargs) for i in impls]
        out: list[tuple[str, Any]] = []
        for impl, result in zip(impls, results):
            if result is None:
                continue
            items: Iterable[Any] = result if isinstance(result, (list, tuple)) else (result,)
            for item in items:
                if not isinstance(item, allowed):
                    raise self._bad_type(hook, impl, result,
                                         " or ".join(t.__name__ for t in allowed)
                                         + ", a list of them, or None")
                out.append((impl.plugin, item))
        return out

    async def notify(self, hook: str, reverse: bool = False, fatal: bool = False,
                     **kwargs: Any) -> None:
        """Call every implementation; failures are logged (re-raised when ``fatal``)."""
        impls = self.impls(hook)
        for impl in reversed(impls) if reverse else impls:
            try:
                await self._call(hook, impl, kwargs)
            except HookFailure:
                if fatal:
                    raise
