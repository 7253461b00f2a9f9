"""Calling hook implementations: order, await, timeouts, failures.

pluggy only calls functions, and ``firstresult`` cannot await coroutines, so the
core walks ``get_hookimpls()`` itself. Order is the ``[plugins] enabled`` list,
then built-ins (which are ``trylast``). How a hook is called — first answer,
collect, notify — and what it may answer is the hook's
:class:`~elemta.hookspecs.Dispatch`, read from the contract: a call site only
names the hook. A plugin that raises, times out or answers with a value its
hook does not allow raises :class:`HookFailure`, which the SMTP layer turns into
``451 4.3.0``.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any, Callable, Coroutine, Iterable, Sequence

import pluggy

from .hookspecs import Dispatch, Mode, dispatch_of

log = logging.getLogger("elemta.hooks")


class HookFailure(Exception):
    """A plugin failed in a hook; the stage must answer a temporary failure."""

    def __init__(self, hook: str, plugin: str, reason: str) -> None:
        self.hook = hook
        self.plugin = plugin
        self.reason = reason
        super().__init__(f"plugin {plugin} failed in hook {hook}: {reason}")


class Answers:
    """What the implementations of one hook call answered, as ``(plugin, value)`` pairs.

    For the first-answer modes there is at most one pair: :attr:`value` and
    :attr:`plugin` (both ``None`` when nobody answered). For the collect modes
    every non-``None`` item, in call order: :attr:`values`. Notify modes answer
    nothing.
    """

    __slots__ = ("items",)

    def __init__(self, items: list[tuple[str, Any]]) -> None:
        self.items = items

    @property
    def value(self) -> Any:
        return self.items[0][1] if self.items else None

    @property
    def plugin(self) -> str | None:
        return self.items[0][0] if self.items else None

    @property
    def values(self) -> list[Any]:
        return [value for _, value in self.items]

    def __repr__(self) -> str:
        return f"<Answers {self.items!r}>"


NO_ANSWER = Answers([])


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
        self._specs: dict[str, Dispatch] = {}
        self._deadlines = Deadlines()

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

    # ------------------------------------------------------------------ entry points

    def dispatch(self, hook: str) -> Dispatch:
        spec = self._specs.get(hook)
        if spec is None:
            spec = self._specs[hook] = dispatch_of(hook)
        return spec

    def call(self, hook: str, **kwargs: Any) -> Coroutine[Any, Any, Answers]:
        """Call ``hook`` as its contract says (await it); raises :class:`HookFailure`
        (except notify)."""
        # A plain function handing back the coroutine: awaiting it costs no extra frame.
        return self._dispatch(hook, kwargs)

    async def _dispatch(self, hook: str, kwargs: dict[str, Any]) -> Answers:
        spec = self._specs.get(hook) or self.dispatch(hook)
        mode = spec.mode
        if mode.is_first:
            # inline: this is every SMTP stage, several times per message
            for impl in self._cache.get(hook) or self.impls(hook):
                result = self._call_sync(hook, impl, kwargs)
                if impl.is_async or _awaitable(result):
                    result = await self._await(hook, impl, result)
                if result is None:
                    continue
                self._check(hook, impl, spec, result)
                return Answers([(impl.plugin, result)])
            return NO_ANSWER
        if mode.at_startup:
            raise TypeError(f"hook {hook} is called at start-up: use call_at_startup()")
        if mode.is_collect:
            return await self._collect(hook, spec, kwargs)
        await self._notify(hook, mode, kwargs)
        return NO_ANSWER

    def call_at_startup(self, hook: str, **kwargs: Any) -> Answers:
        """Call a ``register_*`` hook: plain functions, no event loop needed.

        A plugin that raises, or answers what the hook does not allow, raises
        :class:`HookFailure`: one that cannot declare its configuration or
        metrics stops start-up (or the command line) with its name.
        """
        spec = self.dispatch(hook)
        if not spec.mode.at_startup:
            raise TypeError(f"hook {hook} is not a start-up hook: use call()")
        items: list[tuple[str, Any]] = []
        for impl in self.impls(hook):
            try:
                result = impl.function(*[kwargs[a] for a in impl.argnames])
            except Exception as e:
                raise self._raised(hook, impl, e) from e
            if inspect.isawaitable(result):
                close = getattr(result, "close", None)
                if close is not None:
                    close()
                raise self._bad_type(hook, impl, result, "a plain def, not async def")
            if result is None or spec.mode is Mode.STARTUP_NOTIFY:
                continue
            if not isinstance(result, spec.allowed):
                raise self._bad_type(hook, impl, result, spec.describe_allowed())
            items.append((impl.plugin, result))
        return Answers(items)

    # ------------------------------------------------------------------ modes

    async def _collect(self, hook: str, spec: Dispatch, kwargs: dict[str, Any]) -> Answers:
        """Collect all non-``None`` results; lists are flattened and each item checked."""
        impls = self.impls(hook)
        if spec.mode is Mode.COLLECT_CONCURRENT and len(impls) > 1:
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
                if not isinstance(item, spec.allowed):
                    raise self._bad_type(hook, impl, result, spec.describe_allowed())
                out.append((impl.plugin, item))
        return Answers(out)

    async def _notify(self, hook: str, mode: Mode, kwargs: dict[str, Any]) -> None:
        """Call every implementation; failures are logged (re-raised for ``NOTIFY_FATAL``)."""
        impls = self.impls(hook)
        for impl in reversed(impls) if mode is Mode.NOTIFY_REVERSE else impls:
            try:
                await self._call(hook, impl, kwargs)
            except HookFailure:
                if mode is Mode.NOTIFY_FATAL:
                    raise

    # ------------------------------------------------------------------ one call

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
            if impl.observe is not None and not _awaitable(result):
                impl.observe(time.perf_counter() - start)

    async def _await(self, hook: str, impl: Impl, awaitable: Any) -> Any:
        """Await an implementation's result under its timeout."""
        start = time.perf_counter()
        limit = self._deadlines.start(impl.timeout)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if not self._deadlines.expired(limit):
                raise
            log.error("plugin %s timed out in hook %s after %.1fs", impl.plugin, hook,
                      impl.timeout)
            raise HookFailure(hook, impl.plugin, f"timed out after {impl.timeout:g}s") from None
        except Exception as e:
            raise self._raised(hook, impl, e) from e
        finally:
            self._deadlines.end(limit)
            if impl.observe is not None:
                impl.observe(time.perf_counter() - start)

    async def _call(self, hook: str, impl: Impl, kwargs: dict[str, Any]) -> Any:
        result = self._call_sync(hook, impl, kwargs)
        if impl.is_async or _awaitable(result):
            return await self._await(hook, impl, result)
        return result

    def _check(self, hook: str, impl: Impl, spec: Dispatch, result: Any) -> None:
        if not isinstance(result, spec.allowed) or (
                spec.items and not all(isinstance(i, spec.items) for i in result)):
            raise self._bad_type(hook, impl, result, spec.describe_allowed())

    def _raised(self, hook: str, impl: Impl, e: Exception) -> HookFailure:
        log.error("plugin %s raised in hook %s: %s: %s", impl.plugin, hook,
                  type(e).__name__, e, exc_info=e)
        return HookFailure(hook, impl.plugin, f"{type(e).__name__}: {e}")

    def _bad_type(self, hook: str, impl: Impl, result: Any, allowed: str) -> HookFailure:
        log.error("plugin %s returned %r from hook %s; allowed: %s", impl.plugin, result,
                  hook, allowed)
        return HookFailure(hook, impl.plugin, f"returned {type(result).__name__}, "
                           f"allowed: {allowed}")


class _Limit:
    __slots__ = ("task", "deadline", "cancelling", "fired")

    def __init__(self, task: asyncio.Task[Any], deadline: float, cancelling: int) -> None:
        self.task = task
        self.deadline = deadline
        self.cancelling = cancelling    # the task's cancel requests when the call began
        self.fired = False              # the limit cancelled the task


class Deadlines:
    """The time limits of hook calls (and of the SMTP client's reads) under way, enforced
    by one timer for all of them.

    ``asyncio.timeout`` schedules and cancels a timer per call, about 10 µs
    each, several times a message; most calls answer at once. Here a call
    adds itself to a set; a timer running every :attr:`TICK` seconds while calls
    are under way cancels the task of each call past its deadline, as
    ``asyncio.timeout`` would (so a limit fires up to one tick late).
    """

    TICK = 0.05

    def __init__(self) -> None:
        self._limits: set[_Limit] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self, seconds: float) -> _Limit:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:      # another loop (tests): what was here is gone
            self._loop, self._timer = loop, None
            self._limits.clear()
        task = asyncio.current_task()
        assert task is not None, "hooks are awaited in a task"
        limit = _Limit(task, loop.time() + seconds, task.cancelling())
        self._limits.add(limit)
        if self._timer is None:
            self._timer = loop.call_later(self.TICK, self._sweep)
        return limit

    def expired(self, limit: _Limit) -> bool:
        """Whether the CancelledError under way is the limit's, not someone else's."""
        if not limit.fired:
            return False
        limit.fired = False
        return limit.task.uncancel() <= limit.cancelling

    def end(self, limit: _Limit) -> None:
        self._limits.discard(limit)
        if limit.fired:                 # fired as the call ended: take the request back
            limit.fired = False
            limit.task.uncancel()

    def _sweep(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        for limit in [lim for lim in self._limits if lim.deadline <= now and not lim.fired]:
            limit.fired = True
            limit.task.cancel()
        self._timer = self._loop.call_later(self.TICK, self._sweep) if self._limits else None


def _awaitable(result: Any) -> bool:
    """``inspect.isawaitable``, answered at once for ``None`` (most hook calls' answer),
    for which it would go as far as an ABC check."""
    return result is not None and inspect.isawaitable(result)
