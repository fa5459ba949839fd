"""AsyncLLMEngine: the engine loop on its own thread, one async stream per request."""
from __future__ import annotations

import asyncio
import logging
import time

import pytest
from server_fixtures import tiny_model_path, wait_until

from llmserve.config import EngineConfig
from llmserve.engine.async_engine import AsyncLLMEngine, EngineOverloadedError
from llmserve.errors import EngineDeadError, InvalidRequestError, PromptTooLongError
from llmserve.sampling_params import SamplingParams

SECRET = "CANARY-async-5d1e"


def make_engine(**kw) -> AsyncLLMEngine:
    return AsyncLLMEngine.from_config(EngineConfig(model=str(tiny_model_path()), num_kv_blocks=128, **kw))


@pytest.fixture(scope="module")
def engine():
    eng = make_engine()
    yield eng
    eng.shutdown()


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def all_free(eng: AsyncLLMEngine) -> bool:
    s = eng.stats()
    return not eng.engine.groups and s.kv_usage == 0.0 and s.num_running == 0 and s.num_waiting == 0


async def run(eng: AsyncLLMEngine, prompt: list[int], params: SamplingParams, rid: str):
    outs = [out async for out in eng.generate(prompt, params, rid)]
    return outs


def test_concurrent_requests_stream_cumulative_outputs(engine):
    async def main():
        return await asyncio.gather(*(run(engine, [5, 6, 7, 8], greedy(12), f"c{i}") for i in range(4)))

    results = asyncio.run(main())
    finals = [outs[-1] for outs in results]
    assert all(f.finished and len(f.outputs[0].token_ids) == 12 for f in finals)
    assert len({tuple(f.outputs[0].token_ids) for f in finals}) == 1  # same greedy prompt, same tokens
    for outs in results:  # cumulative: every output extends the one before
        lengths = [len(o.outputs[0].token_ids) for o in outs]
        assert lengths == sorted(lengths) and not any(o.finished for o in outs[:-1])
    assert wait_until(lambda: all_free(engine))


def test_validation_errors_raise_before_any_output(engine):
    async def main():
        for prompt, error in (([], InvalidRequestError), ([1] * 600, PromptTooLongError),
                              ([1, 10**6], InvalidRequestError)):
            with pytest.raises(error):
                await engine.add_request("bad", prompt, greedy(4))
        await engine.add_request("dup", [1, 2], greedy(50))
        with pytest.raises(InvalidRequestError):
            await engine.add_request("dup", [1, 2], greedy(4))
        engine.abort("dup")
        return await run(engine, [3, 4], greedy(3), "after")  # the engine goes on

    assert asyncio.run(main())[-1].finished
    assert wait_until(lambda: all_free(engine))


def test_a_consumer_that_leaves_aborts_its_request_and_frees_blocks(engine):
    async def main():
        other = asyncio.create_task(run(engine, [9, 8, 7], greedy(30), "stays"))
        gen = engine.generate([1, 2, 3], greedy(400), "leaves")
        async for out in gen:
            if len(out.outputs[0].token_ids) >= 3:
                break
        await gen.aclose()  # what a disconnect does to the server's iterator
        freed = await asyncio.to_thread(
            wait_until, lambda: "leaves" not in engine.engine.groups and engine.engine.kv.block_ids("leaves") == [])
        return freed, await other

    freed, other = asyncio.run(main())
    assert freed and other[-1].finished and len(other[-1].outputs[0].token_ids) == 30
    assert wait_until(lambda: all_free(engine))


def test_cancelling_the_consumer_task_aborts_the_request(engine):
    async def main():
        task = asyncio.create_task(run(engine, [4, 4, 4], greedy(400), "cancelled"))
        await asyncio.to_thread(wait_until, lambda: engine.stats().num_running == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert wait_until(lambda: all_free(engine))


def test_waiting_queue_is_bounded():
    eng = make_engine(max_num_seqs=1, max_waiting_requests=1)
    try:
        async def main():
            running = await eng.add_request("a", [1, 2], greedy(400))
            await asyncio.to_thread(wait_until, lambda: eng.stats().num_running == 1)
            waiting = await eng.add_request("b", [1, 2], greedy(400))
            await asyncio.to_thread(wait_until, lambda: eng.stats().num_waiting == 1)
            with pytest.raises(EngineOverloadedError):
                await eng.add_request("c", [1, 2], greedy(4))
            running.close()
            waiting.close()
            await asyncio.to_thread(wait_until, lambda: all_free(eng))
            return await run(eng, [1, 2], greedy(2), "d")  # room again

        assert asyncio.run(main())[-1].finished
    finally:
        eng.shutdown()


def test_a_failing_step_fails_every_request_and_marks_the_engine_dead(caplog):
    eng = make_engine()
    real_step, calls = eng.engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError(SECRET)
        return real_step()

    eng.engine.step = failing_step
    try:
        async def main():
            results = await asyncio.gather(*(run(eng, [1, 2, 3], greedy(50), f"f{i}") for i in range(3)),
                                           return_exceptions=True)
            assert all(isinstance(r, EngineDeadError) for r in results)
            with pytest.raises(EngineDeadError):
                await eng.add_request("late", [1, 2], greedy(2))

        with caplog.at_level(logging.ERROR):
            asyncio.run(asyncio.wait_for(main(), timeout=30))  # no client hangs
        health = eng.health()
        assert not health.alive and health.error == "RuntimeError"
        assert "RuntimeError" in caplog.text and SECRET not in caplog.text
    finally:
        eng.shutdown()


def test_shutdown_ends_open_streams_and_refuses_new_requests():
    eng = make_engine()

    async def main():
        stream = await eng.add_request("open", [1, 2], greedy(400))
        await stream.next()
        await asyncio.to_thread(eng.shutdown)
        with pytest.raises(EngineDeadError):
            while True:
                await stream.next()
        with pytest.raises(EngineDeadError):
            await eng.add_request("late", [1, 2], greedy(2))

    asyncio.run(asyncio.wait_for(main(), timeout=30))
    assert not eng.health().alive


def test_an_idle_loop_sleeps(engine):
    assert wait_until(lambda: all_free(engine))
    start_cpu, start = time.process_time(), time.monotonic()
    time.sleep(1.0)
    assert time.process_time() - start_cpu < 0.3 * (time.monotonic() - start)  # no busy spin
    assert engine.health().alive and engine.health().last_heartbeat_age_s < 2.5


def test_engine_is_built_and_run_on_the_loop_thread(tmp_path):
    import threading

    built_on = []

    def build():
        from llmserve.engine.engine import LLMEngine

        built_on.append(threading.current_thread().name)
        return LLMEngine(EngineConfig(model=str(tiny_model_path()), num_kv_blocks=64))

    eng = AsyncLLMEngine(build)
    try:
        assert built_on == ["llmserve-engine"]
        outs = asyncio.run(run(eng, [5, 6, 7], greedy(3), "t"))
        assert len(outs[-1].outputs[0].token_ids) == 3
    finally:
        eng.shutdown()


def test_a_failed_build_raises_in_the_caller(tmp_path):
    from llmserve.errors import ModelLoadError

    with pytest.raises(ModelLoadError):
        AsyncLLMEngine.from_config(EngineConfig(model=str(tmp_path / "missing")))
