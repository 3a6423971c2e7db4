"""uhlm for Python: uncertainty-aware hybrid language models.

The generated bindings (``uhlm.uhlm_ffi``) are re-exported as they are; :class:`Engine` adds
an asyncio-shaped layer::

    models = uhlm.ensure_default_models()
    async with uhlm.Engine.load(uhlm.EngineConfig(slm_path=..., server=..., pin=..., api_key=...)) as engine:
        async for event in engine.stream("The capital of France is"):
            print(event.text, end="")

Cancelling the awaiting task (or leaving the ``async for``) cancels the generation in Rust.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable, Optional, Sequence

from .uhlm_ffi import *  # noqa: F401,F403  (the generated API is the package's API)
from .uhlm_ffi import (
    ChatMessage,
    EngineConfig,
    EngineStats,
    GenerationOptions,
    GenerationSummary,
    HybridEngine,
    LoadProgressListener,
    TokenEvent,
    TokenListener,
)

__all__ = ["Engine"] + [n for n in dir() if not n.startswith("_")]

# uniffi's exceptions print their fields; print the Rust text instead, as Kotlin and Swift do.
UhlmError.__str__ = lambda self: describe_error(self)  # type: ignore[name-defined]  # noqa: F405


class _Listener(TokenListener):
    """Forwards token events and link changes to callables; runs on an engine thread."""

    def __init__(
        self,
        on_token: Callable[[TokenEvent], None],
        on_link_change: Optional[Callable[[bool, str], None]] = None,
    ):
        self._on_token = on_token
        self._on_link_change = on_link_change

    def on_token(self, event: TokenEvent) -> None:
        self._on_token(event)

    def on_link_change(self, online: bool, detail: str) -> None:
        if self._on_link_change is not None:
            self._on_link_change(online, detail)

    def on_tail_text(self, text: str) -> None:
        pass


class _Progress(LoadProgressListener):
    """Forwards loading progress to a callable; runs on the loading thread."""

    def __init__(self, on_progress: Callable[[float], None]):
        self._on_progress = on_progress

    def on_progress(self, fraction: float) -> None:
        self._on_progress(fraction)


class _Loading:
    """``Engine.load(...)``: awaitable, and usable directly as ``async with``."""

    def __init__(self, config: EngineConfig, on_progress: Optional[Callable[[float], None]]):
        self._config = config
        self._on_progress = on_progress
        self._engine: Optional[Engine] = None

    def __await__(self):
        return asyncio.to_thread(Engine, self._config, self._on_progress).__await__()

    async def __aenter__(self) -> "Engine":
        self._engine = await self
        return self._engine

    async def __aexit__(self, *exc) -> None:
        if self._engine is not None:
            self._engine.close()


class Engine:
    """A :class:`HybridEngine` with coroutine methods. Close it (or use ``with``) to release
    the on-device model."""

    def __init__(
        self, config: EngineConfig, on_progress: Optional[Callable[[float], None]] = None
    ):
        progress = _Progress(on_progress) if on_progress else None
        self._engine: Optional[HybridEngine] = HybridEngine.with_progress(config, progress)

    @staticmethod
    def load(
        config: EngineConfig, on_progress: Optional[Callable[[float], None]] = None
    ) -> _Loading:
        """Loads the on-device model in a worker thread; ``on_progress`` gets the fraction
        read so far (0 to 1)."""
        return _Loading(config, on_progress)

    @property
    def raw(self) -> HybridEngine:
        if self._engine is None:
            raise ValueError("the engine is closed")
        return self._engine

    async def generate(
        self,
        prompt: "str | Sequence[ChatMessage]",
        options: Optional[GenerationOptions] = None,
        on_token: Optional[Callable[[TokenEvent], None]] = None,
        on_link_change: Optional[Callable[[bool, str], None]] = None,
    ) -> GenerationSummary:
        """Generates from a text prompt or a conversation; ``on_token`` runs on an engine
        thread for every final token, ``on_link_change(online, detail)`` when the server link
        goes down (tokens go on as ``OFFLINE``) or comes back. Raises ``UhlmError``."""
        listener = _Listener(on_token or (lambda _event: None), on_link_change)
        options = options or GenerationOptions()
        if isinstance(prompt, str):
            return await self.raw.generate(prompt, options, listener)
        return await self.raw.generate_chat(list(prompt), options, listener)

    async def stream(
        self,
        prompt: "str | Sequence[ChatMessage]",
        options: Optional[GenerationOptions] = None,
    ) -> AsyncIterator[TokenEvent]:
        """Yields the tokens of one generation; leaving the loop early cancels it."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        def on_token(event: TokenEvent) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        task = asyncio.ensure_future(self.generate(prompt, options, on_token))
        # Events are posted to the loop before the task completes, so `done` comes last.
        task.add_done_callback(lambda _task: queue.put_nowait(done))
        try:
            while True:
                item = await queue.get()
                if item is done:
                    break
                yield item
            task.result()
        finally:
            if not task.done():
                task.cancel()
                try:
                    await task
                except BaseException:  # the cancellation (or the error) ends the generation
                    pass

    def cancel(self) -> None:
        """Cancels every generation in flight; each raises ``UhlmError.Cancelled``."""
        self.raw.cancel()

    def stats(self) -> EngineStats:
        return self.raw.stats()

    def vocab_size(self) -> int:
        """The on-device model's vocabulary size: a dense f32 distribution per token (the
        papers' HLM baseline) costs 4 bytes times this, the reference for bytes saved."""
        return self.raw.vocab_size()

    def network_changed(self) -> None:
        self.raw.network_changed()

    def close(self) -> None:
        self._engine = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
