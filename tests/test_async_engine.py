"""AsyncLLMEngine: the engine loop on its own thread, one async stream per request."""
from __future__ import annotations

import asyncio
import logging
import time

import pytest
from server_fixtures import tiny_model_path, wait_until

from llmserve.config import EngineConfig
from llmserve.engine.async_engine import (
    MAX_CONSECUTIVE_STEP_FAILURES,
    AsyncLLMEngine,
    EngineOverloadedError,
    RequestStream,
)
from llmserve.errors import EngineDeadError, EngineStepError, InvalidRequestError, PromptTooLongError
from llmserve.outputs import CompletionOutput, RequestOutput
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


def fail_steps(eng: AsyncLLMEngine, failing: set[int]) -> list[int]:
    """Make the engine's step calls numbered in failing (from 1) raise; returns the call log."""
    real_step, calls = eng.engine.step, []

    def step():
        calls.append(1)
        if len(calls) in failing:
            raise RuntimeError(SECRET)
        return real_step()

    eng.engine.step = step
    return calls


def test_a_failing_step_fails_only_its_requests_and_the_engine_goes_on(caplog):
    eng = make_engine()
    calls = fail_steps(eng, {3})
    try:
        async def main():
            results = await asyncio.gather(*(run(eng, [1, 2, 3], greedy(50), f"f{i}") for i in range(3)),
                                           return_exceptions=True)
            assert all(isinstance(r, EngineStepError) for r in results), results
            failing = eng.health()  # no step with work has run since the failure
            after = await run(eng, [4, 5, 6], greedy(5), "after")  # a new request is served
            return failing, after

        with caplog.at_level(logging.ERROR):
            failing, after = asyncio.run(asyncio.wait_for(main(), timeout=30))  # no client hangs
        assert (failing.alive, failing.accepting, failing.error, failing.consecutive_step_failures) == (
            False, True, "RuntimeError", 1)
        assert after[-1].finished and len(after[-1].outputs[0].token_ids) == 5
        health = eng.health()
        assert health.alive and health.accepting and health.error is None and len(calls) > 3
        assert wait_until(lambda: all_free(eng))  # the failed requests' blocks were freed
        assert "RuntimeError" in caplog.text and SECRET not in caplog.text
    finally:
        eng.shutdown()


def test_steps_failing_again_and_again_end_the_loop(caplog):
    eng = make_engine()
    fail_steps(eng, set(range(1, 100)))
    try:
        async def main():
            for i in range(MAX_CONSECUTIVE_STEP_FAILURES - 1):  # each request fails alone; the engine goes on
                with pytest.raises(EngineStepError):
                    await run(eng, [1, 2, 3], greedy(5), f"r{i}")
                assert eng.health().accepting and not eng.health().alive
            with pytest.raises(EngineDeadError):  # the last straw
                await run(eng, [1, 2, 3], greedy(5), "last")
            with pytest.raises(EngineDeadError):
                await eng.add_request("late", [1, 2], greedy(2))

        with caplog.at_level(logging.ERROR):
            asyncio.run(asyncio.wait_for(main(), timeout=30))
        health = eng.health()
        assert not health.alive and not health.accepting and health.error == "RuntimeError"
        assert SECRET not in caplog.text
    finally:
        eng.shutdown()


def test_requests_refused_one_by_one_do_not_count_as_failed_steps():
    """An output ended in error while no step failed (a replica refusing a request the front end's
    checks let through) fails that request only: more of them than the failed-step limit leave the
    loop alive and serving."""
    eng = make_engine()
    inner = eng.engine
    real_step = inner.step

    def step():
        outputs = real_step()
        refused = [rid for rid in list(inner.groups) if rid.startswith("refused")]
        inner.abort_request(refused)
        ended = [RequestOutput(rid, None, [1, 2, 3], [CompletionOutput(0, "", [], "error")], True) for rid in refused]
        assert inner.last_step_error is None
        return outputs + ended

    inner.step = step
    try:
        async def main():
            for i in range(MAX_CONSECUTIVE_STEP_FAILURES + 1):
                with pytest.raises(EngineStepError, match="refused"):
                    await run(eng, [1, 2, 3], greedy(5), f"refused{i}")
            return await run(eng, [4, 5], greedy(3), "served")

        after = asyncio.run(asyncio.wait_for(main(), timeout=30))
        assert after[-1].finished and len(after[-1].outputs[0].token_ids) == 3
        health = eng.health()
        assert health.alive and health.accepting and health.consecutive_step_failures == 0
        assert wait_until(lambda: all_free(eng))
    finally:
        eng.shutdown()


def test_a_forward_failure_the_engine_catches_reaches_the_client_as_an_error():
    eng = make_engine()
    runner = eng.engine.runner
    real_execute, calls = runner.execute, []

    def execute(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError(SECRET)
        return real_execute(*args, **kwargs)

    runner.execute = execute
    try:
        async def main():
            with pytest.raises(EngineStepError):
                await run(eng, [1, 2, 3], greedy(20), "caught")
            assert not eng.health().alive and eng.health().accepting
            return await run(eng, [4, 5], greedy(3), "next")

        after = asyncio.run(asyncio.wait_for(main(), timeout=30))
        assert after[-1].finished and eng.health().alive
        assert wait_until(lambda: all_free(eng))
    finally:
        eng.shutdown()


def _output(num_tokens: int, finished: bool = False) -> RequestOutput:
    completion = CompletionOutput(0, "x" * num_tokens, list(range(num_tokens)), "length" if finished else None)
    return RequestOutput("s", None, [1, 2], [completion], finished)


def test_a_slow_reader_holds_one_output_and_gets_the_newest():
    async def main():
        stream = RequestStream("s", asyncio.get_running_loop(), lambda rid: None)
        # The loop thread pushes a cumulative output every step; the reader reads none of them.
        await asyncio.to_thread(lambda: [stream.push(_output(i)) for i in range(1, 1001)])
        await asyncio.sleep(0)
        held = stream.num_pending
        newest = await stream.next()
        # The final output is never overtaken, neither by a later output nor by an error.
        await asyncio.to_thread(lambda: [stream.push(x) for x in (_output(1001), _output(1002, finished=True),
                                                                   _output(1003), RuntimeError("late"))])
        await asyncio.sleep(0)
        final = await stream.next()
        return held, newest, final, stream

    held, newest, final, stream = asyncio.run(asyncio.wait_for(main(), timeout=10))
    assert held == 1 and len(newest.outputs[0].token_ids) == 1000 and not newest.finished
    assert final.finished and len(final.outputs[0].token_ids) == 1002
    assert stream.finished and stream.num_pending == 0


def test_an_error_replaces_an_unread_output_and_ends_the_stream():
    async def main():
        stream = RequestStream("s", asyncio.get_running_loop(), lambda rid: None)
        await asyncio.to_thread(lambda: [stream.push(x) for x in (_output(1), EngineStepError("x"), _output(2))])
        await asyncio.sleep(0)
        assert stream.num_pending == 1
        with pytest.raises(EngineStepError):
            await stream.next()
        assert stream.finished
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()

    asyncio.run(asyncio.wait_for(main(), timeout=10))


def test_the_callers_tokenizer_is_not_the_one_the_loop_uses(engine):
    assert engine.tokenizer is not engine.engine.tokenizer
    assert engine.tokenizer.encode("Hello world") == engine.engine.tokenizer.encode("Hello world")


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
