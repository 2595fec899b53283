"""One reply in the making, as its reader sees it: text pieces (with logprobs) as they come, counts
and the finish reason at the end, and :meth:`Generation.stop` from any thread.

The scheduler thread (:mod:`danlu.infer.batch`) pushes pieces; readers take them blocking
(``for piece in gen``), or from an asyncio loop (``async for delta in gen.deltas_async()``)
without holding a thread per reply. The decoding thread wakes each asyncio loop at most once a
step, however many of its replies moved, and a reader that fell behind gets what piled up as
one piece: the readers' work (a server's chunks) does not grow by the token when it lags. Also here: turning token ids into text piece by piece,
holding back what may be the start of a stop string.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from danlu.infer.sampling import TokenLogprob


@dataclass
class Delta:
    """New text of a reply and the tokens it came from (their logprobs, when asked for)."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


class Generation:
    """A reply: iterate for text pieces; counts and the finish reason are set at the end.

    ``finish_reason`` is ``"stop"`` (end-of-turn token, a stop string, or stopped early) or
    ``"length"`` (``max_new_tokens`` or the context window reached). Leaving the iteration
    early, or :meth:`stop`, stops the model at its next step.
    """

    def __init__(self, prompt_tokens: int, max_new_tokens: int = 0) -> None:
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens  # after clamping to the context window
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] = []
        self.reasoning_open = False  # the prompt opened a <think> block: the reply starts inside it
        self.cancelled = threading.Event()
        self._items: deque[Delta] = deque()
        self._cond = threading.Condition()
        self._finished = False
        self._error: BaseException | None = None
        self._watchers: list[Callable[[], None]] = []

    # ---------------------------------------------------------------- scheduler side

    def _push(self, delta: Delta, wake: bool = True) -> None:
        """Add a piece; ``wake=False`` leaves waking the watchers to a later :meth:`_wake` (the
        decoding thread wakes once after a whole step)."""
        with self._cond:
            self._items.append(delta)
            self.logprobs.extend(delta.logprobs)
            self._cond.notify_all()
        if wake:
            self._wake()

    def _wake(self) -> None:
        with self._cond:
            watchers = list(self._watchers)
        for w in watchers:
            w()

    def _finish(self, reason: str, error: BaseException | None = None, wake: bool = True) -> None:
        with self._cond:
            if self._finished:
                return
            self.finish_reason, self._error, self._finished = reason, error, True
            self._cond.notify_all()
        if wake:
            self._wake()

    # ---------------------------------------------------------------- reader side

    @property
    def finished(self) -> bool:
        """Whether the model is done with this reply (pieces may still wait to be read)."""
        return self._finished

    def stop(self) -> None:
        """Ask the model to stop at its next step; safe from any thread (e.g. a client went away)."""
        self.cancelled.set()

    def poll(self) -> tuple[list[Delta], bool]:
        """Pieces ready now (at most one: what piled up is joined), and whether that is all there
        will be; raises what the model raised."""
        with self._cond:
            items = list(self._items)
            self._items.clear()
            done, error = self._finished, self._error
        if done and error is not None:
            raise error
        if len(items) > 1:
            items = [Delta("".join(d.text for d in items), [e for d in items for e in d.logprobs])]
        return items, done

    def watch(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (from the model's thread) whenever something new is ready."""
        with self._cond:
            self._watchers.append(callback)
        callback()

    def deltas(self) -> Iterator[Delta]:
        """Pieces as they come, blocking; leaving early stops the model."""
        done = False
        try:
            while True:
                with self._cond:
                    while not self._items and not self._finished:
                        self._cond.wait(0.1)  # short waits: Ctrl-C reaches the reading thread
                items, done = self.poll()
                yield from items
                if done:
                    return
        finally:
            if not done:
                self.stop()

    async def deltas_async(self) -> AsyncIterator[Delta]:
        """Pieces as they come, for an asyncio loop; cancelling or leaving early stops the model."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        waker = _waker(loop)

        def wake() -> None:
            if not waker.wake(ready):  # the loop has closed: nobody is reading any more
                self.stop()

        self.watch(wake)
        done = False
        try:
            while True:
                ready.clear()
                items, done = self.poll()
                for item in items:
                    yield item
                if done:
                    return
                await ready.wait()
        finally:
            with self._cond:
                if wake in self._watchers:
                    self._watchers.remove(wake)
            if not done:
                self.stop()

    def __iter__(self) -> Iterator[str]:
        for delta in self.deltas():
            if delta.text:
                yield delta.text

    def text(self) -> str:
        """Run to the end and return the whole text (not stripped)."""
        return "".join(self)


class _Waker:
    """Sets asyncio events from another thread with at most one call into their loop pending:
    the decoding thread's pushes of one step cost one wake-up of the loop, not one per reply."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: set[asyncio.Event] = set()
        self.scheduled = False

    def wake(self, event: asyncio.Event) -> bool:
        """Set ``event`` soon on its loop; False when the loop has closed. Inside
        :func:`wake_all`, only noted: the loop is called once at its end."""
        if self.loop.is_closed():
            return False
        with self.lock:
            self.pending.add(event)
        held = getattr(_held, "wakers", None)
        if held is not None:
            held.add(self)
            return True
        return self.flush()

    def flush(self) -> bool:
        """One call into the loop for every event pending (none if one is on its way already)."""
        with self.lock:
            if self.scheduled or not self.pending:
                return True
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._set)
        except RuntimeError:
            with self.lock:
                self.scheduled = False
            return False
        return True

    def _set(self) -> None:
        with self.lock:
            events, self.pending, self.scheduled = self.pending, set(), False
        for event in events:
            event.set()


_wakers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_held = threading.local()  # the wakers noted by this thread's wake_all


def wake_all(gens: list[Generation]) -> None:
    """Wake the readers of ``gens`` (the replies one decoding step moved): each asyncio loop
    among them is called once, not once per reply."""
    _held.wakers = set()
    try:
        for gen in gens:
            gen._wake()
    finally:
        wakers, _held.wakers = _held.wakers, None
    for waker in wakers:  # a loop closed since: its readers' next wake-up stops their replies
        waker.flush()


def _waker(loop: asyncio.AbstractEventLoop) -> _Waker:
    with _wakers_lock:
        if loop not in _wakers:
            _wakers[loop] = _Waker(loop)
        return _wakers[loop]


_wakers_lock = threading.Lock()


class Detokenizer:
    """Token ids → text pieces, holding back what may be the start of a stop string.

    Decodes a short window of recent tokens (as vLLM does) so that pieces join up exactly and a
    character split over several tokens comes out whole.
    """

    def __init__(self, tokenizer: Any, stops: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.text = ""
        self.sent = 0  # characters handed out
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending: list[tuple[int, TokenLogprob]] = []  # (start offset, entry) not handed out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token: int, entry: TokenLogprob | None) -> tuple[Delta | None, bool]:
        """Take one generated token; return the text now safe to hand out and whether a stop
        string ended the reply (its text then ends just before the stop string)."""
        start = len(self.text)
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        if entry is not None:
            self.pending.append((start, entry))
        for stop in self.stops:
            at = self.text.find(stop, max(0, self.sent - len(stop) + 1))
            if at >= 0:
                self.text = self.text[:at]
                self.pending = [(s, e) for s, e in self.pending if s < at]  # tokens of the stop string go
                return self._out(at, end=True), True
        return self._out(max(self.sent, len(self.text) - self.hold)), False

    def flush(self) -> Delta | None:
        """The rest, at the end of the reply."""
        return self._out(len(self.text), end=True)

    def _out(self, upto: int, end: bool = False) -> Delta | None:
        piece = self.text[self.sent : upto]
        if end:
            ready, self.pending = [e for _, e in self.pending], []
        else:
            ready = [e for s, e in self.pending if s < upto]
            self.pending = [(s, e) for s, e in self.pending if s >= upto]
        self.sent = max(self.sent, upto)
        if not piece and not ready:
            return None
        return Delta(piece, ready)


async def merged(gens: list[Generation]) -> AsyncIterator[tuple[int, Delta | None]]:
    """``(index, delta)`` from several replies as they come, ``(index, None)`` when one ends.
    Leaving early (a client went away, a Stop button) stops every reply still running."""
    if len(gens) == 1:  # the common case, without tasks
        async for delta in gens[0].deltas_async():
            yield 0, delta
        yield 0, None
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: Generation) -> None:
        try:
            async for delta in gen.deltas_async():
                await queue.put((i, delta, None))
            await queue.put((i, None, None))
        except Exception as e:  # noqa: BLE001 - raised in the reader below
            await queue.put((i, None, e))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    left = len(gens)
    try:
        while left:
            i, delta, error = await queue.get()
            if error is not None:
                raise error
            left -= delta is None
            yield i, delta
    finally:
        for t in tasks:
            t.cancel()
        for g in gens:
            if not g.finished:
                g.stop()
