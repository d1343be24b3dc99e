"""Streaming hand-off: runners feed a TokenSink per step; TokenStream batches, detokenizes, resends."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import pytest

from services.worker.continuous import ContinuousBatcher
from services.worker.engine import EngineItem, StaticBatchEngine
from services.worker.puller import WorkerLoop
from services.worker.token_stream import TokenStream, TokenStreamer
from tests.worker.test_worker_loop import FAST, IDENTITY, fake, make_batch, next_report  # noqa: F401 - fixture

ITEMS = [
    EngineItem("s1", "把下面的句子翻译成英文：我喜欢编程 🐍", 24, is_streamed=True),
    EngineItem("quiet", "Fix the bug: def f(x): return x +", 9),
    EngineItem("s2", "Emoji 🎉👩‍👩‍👧 and 𝔘𝔫𝔦", 17, is_streamed=True),
]


class RecordingSink:
    def __init__(self) -> None:
        self.calls: list[dict[str, list[int]]] = []

    def add_tokens(self, new_tokens):
        self.calls.append({k: list(v) for k, v in new_tokens.items()})

    def ids_of(self, request_id: str) -> list[int]:
        return [t for call in self.calls for t in call.get(request_id, [])]


def _check_streamed(engine, sink: RecordingSink, outputs) -> None:
    for output in outputs:
        ids = sink.ids_of(output.request_id)
        if output.request_id == "quiet":
            assert ids == []  # not streamed: nothing handed over
            continue
        assert len(ids) == output.generated_tokens
        assert engine.tokenizer.decode(ids, skip_special_tokens=True) == output.text


@pytest.fixture(scope="module")
def static_engine(tiny_model_dir) -> StaticBatchEngine:
    return StaticBatchEngine(tiny_model_dir, device="cpu", dtype="float32", backend="static",
                             cpu_kv_budget_bytes=3 * 128 * 512)


def _run_streamed(engine: StaticBatchEngine) -> RecordingSink:
    """engine.run(ITEMS) handing tokens to a RecordingSink; checks what each row got, returns the sink."""
    sink = RecordingSink()
    engine.token_sink = sink
    try:
        output = engine.run(ITEMS)
    finally:
        engine.token_sink = None
    _check_streamed(engine, sink, output.items)
    return sink


def test_generate_path_hands_over_each_rows_own_tokens_every_step(engine):
    sink = _run_streamed(engine)
    assert len(sink.calls) >= 17  # once per step while a streamed row runs


def test_static_backend_hands_over_tokens_every_few_steps(static_engine):
    sink = _run_streamed(static_engine)
    assert len(sink.calls) >= 2  # at the stop checks (every 16 steps) and at the end


def test_continuous_batcher_hands_over_tokens_per_step(static_engine):
    sink = RecordingSink()
    static_engine.token_sink = sink
    batcher = ContinuousBatcher(static_engine, 3)
    try:
        batcher.start()
        results = [f.result(60) for f in [batcher.submit(item) for item in ITEMS]]
    finally:
        batcher.stop(cancel=True, timeout_s=10.0)
        static_engine.token_sink = None
    _check_streamed(static_engine, sink, [r.output for r in results])


def test_token_stream_reports_per_lease_and_resends_what_was_not_accepted(engine):
    stream = TokenStream(engine.tokenizer)
    ids = engine.tokenizer("好的 🙂 ok", add_special_tokens=False)["input_ids"]
    stream.open("b1", ["r1"])
    stream.add_tokens({"r1": ids[:2], "unknown": [1]})
    first = stream.take_report("w")
    assert [(le.batch_id, [(r.request_id, r.token_offset, r.num_tokens) for r in le.requests])
            for le in first.leases] == [("b1", [("r1", 0, 2)])]
    # not accepted (the call failed): the next report carries those tokens again, with the new ones
    stream.add_tokens({"r1": ids[2:]})
    second = stream.take_report("w")
    sent = second.leases[0].requests[0]
    assert (sent.token_offset, sent.num_tokens) == (0, len(ids))
    stream.accepted(second)
    assert stream.take_report("w") is None
    assert sent.text_delta == engine.tokenizer.decode(ids)[:len(sent.text_delta)]
    stream.close("b1")
    assert stream.num_open == 0


@pytest.mark.asyncio
async def test_worker_loop_streams_a_batch_in_several_reports(fake, engine):
    queue, stub, _ = fake
    stream = TokenStream(engine.tokenizer)
    engine.token_sink = stream
    streamer = TokenStreamer(stub, stream, IDENTITY.worker_id, interval_s=0.005)
    streamer.start()
    loop = WorkerLoop(stub, engine, IDENTITY, FAST, token_stream=stream)
    loop.start()
    try:
        batch = make_batch("b1", [(i.request_id, i.prompt, 200) for i in ITEMS])
        for item, batch_item in zip(ITEMS, batch.items):
            batch_item.is_streamed = item.is_streamed
        await queue.batches.put(batch)
        name, report = await next_report(queue, 120)
    finally:
        await loop.stop(1.0)
        await streamer.stop()
        engine.token_sink = None
    assert name == "CompleteBatch"
    streamed: dict[str, str] = defaultdict(str)
    offsets: dict[str, int] = defaultdict(int)
    reports = [r for n, r in queue.calls if n == "StreamTokens"]
    for sent in reports:
        for lease in sent.leases:
            assert lease.batch_id == "b1"
            for delta in lease.requests:
                assert delta.token_offset == offsets[delta.request_id]  # in order, each token once
                offsets[delta.request_id] += delta.num_tokens
                streamed[delta.request_id] += delta.text_delta
    assert len(reports) >= 2 and set(streamed) <= {"s1", "s2"}
    texts = {r.request_id: r.text for r in report.results}
    for request_id, text in streamed.items():
        assert texts[request_id].startswith(text)  # the batcher sends the rest from the answer
    assert stream.num_open == 0
    await asyncio.sleep(0)
