"""The whole hybrid loop from Python, mirroring the Kotlin tests."""

import asyncio
import contextlib
import threading

import pytest

import uhlm
from uhlm import GenerationOptions, Mode, TokenSource, UhlmError

GREEDY = GenerationOptions(temperature=0.0, max_tokens=16)
LONG = GenerationOptions(temperature=0.0, max_tokens=200)


def test_a_hybrid_generation_streams_tokens_in_order_and_its_counts_add_up(make_config):
    progress = []

    async def main():
        events = []
        links = []
        async with uhlm.Engine.load(make_config(Mode.HLM), progress.append) as engine:
            summary = await engine.generate(
                "The capital of France is",
                GREEDY,
                events.append,
                on_link_change=lambda online, _detail: links.append(online),
            )
            return summary, events, links, engine.stats(), engine.vocab_size()

    summary, events, links, lifetime, vocab = asyncio.run(main())
    # The session opened once and never dropped on loopback.
    assert links == [True]
    # SmolLM2's vocabulary, which the derived draft keeps.
    assert vocab == 49152
    assert len(progress) > 2 and progress == sorted(progress) and progress[-1] == 1.0
    assert summary.token_ids
    assert [e.position for e in events] == list(range(len(summary.token_ids)))
    assert [e.token_id for e in events] == summary.token_ids
    assert [e.source for e in events] == summary.sources
    # HLM sends every draft: each token was decided by the server.
    assert all(s in (TokenSource.ACCEPTED, TokenSource.RESAMPLED) for s in summary.sources)
    s = summary.stats
    assert s.sent == s.accepted + s.resampled
    assert s.drafted == s.skipped + s.sent + s.offline
    assert s.offline == 0
    assert s.generated_tokens == len(summary.token_ids)
    assert s.decisions >= s.generated_tokens
    assert summary.text.startswith("".join(e.text for e in events))
    assert lifetime.generations == 1


def test_the_async_iterator_yields_the_same_tokens_as_generate(make_config):
    async def main():
        async with uhlm.Engine.load(make_config(Mode.UHLM)) as engine:
            summary = await engine.generate("Once upon a time", GREEDY)
            streamed = [e async for e in engine.stream("Once upon a time", GREEDY)]
            return summary, streamed

    summary, streamed = asyncio.run(main())
    assert [e.token_id for e in streamed] == summary.token_ids
    assert all(e.source != TokenSource.OFFLINE for e in streamed)


def test_leaving_the_loop_stops_the_generation(make_config):
    async def main():
        async with uhlm.Engine.load(make_config(Mode.HLM)) as engine:
            first = []
            stream = engine.stream("Once upon a time, in a land far away,", LONG)
            async with contextlib.aclosing(stream):
                async for event in stream:
                    first.append(event)
                    if len(first) == 3:
                        break
            # One generation at a time: this completes only if the abandoned one ended.
            nxt = await engine.generate("Hello", GenerationOptions(temperature=0.0, max_tokens=2))
            return first, nxt, engine.stats()

    first, nxt, stats = asyncio.run(main())
    assert [e.position for e in first] == [0, 1, 2]
    assert len(nxt.token_ids) <= 2
    assert stats.generated_tokens < 200


def test_cancel_ends_a_generation_with_cancelled(make_config):
    async def main():
        seen = []
        lock = threading.Lock()
        async with uhlm.Engine.load(make_config(Mode.HLM)) as engine:

            def on_token(event):
                with lock:
                    seen.append(event)
                    if len(seen) == 2:
                        engine.cancel()

            with pytest.raises(UhlmError.Cancelled):
                await engine.generate("Once upon a time, in a land far away,", LONG, on_token)
        return seen

    seen = asyncio.run(main())
    assert 2 <= len(seen) < 200


def test_a_missing_model_file_is_model_not_found():
    with pytest.raises(UhlmError.ModelNotFound) as info:
        uhlm.HybridEngine(
            uhlm.EngineConfig(slm_path="/nonexistent/uhlm-draft.gguf", mode=Mode.SLM)
        )
    assert "uhlm-draft.gguf" in info.value.path
    assert str(info.value) == "on-device model not found: /nonexistent/uhlm-draft.gguf"


def test_a_wrong_api_key_is_unauthorized(make_config):
    async def main():
        async with uhlm.Engine.load(make_config(Mode.HLM, api_key="not-the-key")) as engine:
            await engine.generate("Hello", GREEDY)

    with pytest.raises(UhlmError.Unauthorized) as info:
        asyncio.run(main())
    assert str(info.value).startswith("the server rejected the API key")
