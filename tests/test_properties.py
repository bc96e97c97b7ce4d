"""Property-based bad input (hypothesis): the task payload, the Embedder, the producer's readers,
and forged messages sent straight onto a real worker's queue.

Why properties instead of examples: the inputs that break ingestion are the ones nobody thought
to write down (a lone surrogate inside an id, a NUL in the middle of JSON, a list where a string
belongs). The property every test checks is the same: each bad item gets a clear error of its
own, nothing crashes, and every good item next to it still comes through.
``--hypothesis-show-statistics`` prints how many cases ran.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import msgpack
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deposium.producer.api import documents_to_sources
from deposium.producer.model import InputError
from deposium.producer.readers import Source, jsonl_sources, text_file_sources
from deposium.worker.config import Settings
from deposium.worker.embedder import Embedder, EmbedRequestError
from deposium.worker.wire import REQUEST_FIELDS, TASK_NAME, EmbedRequest, EmbedResponse, WireError
from tests.procs import Worker
from tests.redis_proc import RedisServer

#: Text with what breaks naive code: lone surrogates, NUL and other controls, astral characters.
#: (hypothesis' text() never yields surrogates by itself, so they are mixed in as whole pieces.)
SPECIALS = ["\x00", "\ud800", "\udc80", "\udfff", "\u2028", "\U0001f600", "\ufeff", "\r\n"]
nasty_text = st.lists(st.text(max_size=8) | st.sampled_from(SPECIALS), max_size=8).map("".join)
scalars = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | nasty_text | st.binary(max_size=20)
values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                      max_leaves=12)
good_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,20}", fullmatch=True)


def _valid(**change: object) -> dict:
    return EmbedRequest(job_id="job", batch_id="b0", paragraphs=["text"]).to_wire() | change


@st.composite
def payloads(draw) -> object:
    """Mostly near-valid requests with one or more fields changed, added or removed; sometimes anything."""
    if draw(st.integers(0, 9)) == 0:
        return draw(values)
    p = _valid(job_id=draw(good_ids), batch_id=draw(good_ids),
               paragraphs=draw(st.lists(nasty_text | scalars, max_size=6)))
    for _ in range(draw(st.integers(0, 3))):
        action = draw(st.sampled_from(["set", "drop", "add"]))
        if action == "set":
            p[draw(st.sampled_from(sorted(REQUEST_FIELDS)))] = draw(values)
        elif action == "drop":
            p.pop(draw(st.sampled_from(sorted(REQUEST_FIELDS))), None)
        else:
            p[draw(nasty_text)] = draw(values)
    return p


# -- the task payload -------------------------------------------------------------------------
@settings(max_examples=400, deadline=None)
@given(payloads())
def test_any_payload_is_a_request_or_one_wire_error(payload):
    """Never another exception type (a TypeError or KeyError in the worker would be a bug with a
    misleading message); and whatever is accepted survives the msgpack round trip unchanged."""
    try:
        req = EmbedRequest.from_wire(payload)
    except WireError as exc:
        assert str(exc)
        return
    assert set(payload) == REQUEST_FIELDS
    codecs = [(json.dumps, json.loads),
              (lambda v: msgpack.packb(v, use_bin_type=True), lambda b: msgpack.unpackb(b, raw=False))]
    for encode, decode in codecs:
        if encode is json.dumps and _has_surrogate(req.to_wire()):
            continue  # JSON's \uXXXX escapes merge two lone surrogates into one character
        try:  # JSON cannot carry bytes, msgpack no lone surrogate: such a request never reaches a queue
            wire = encode(req.to_wire())
        except (TypeError, ValueError, UnicodeEncodeError):
            continue
        assert EmbedRequest.from_wire(decode(wire)) == req or _has_nan(payload) or _has_surrogates(payload)


def _has_surrogates(value: object) -> bool:
    """JSON joins two lone surrogates into one character on the way back; the Embedder refuses
    such paragraphs anyway (per-paragraph error), so only their round trip differs."""
    if isinstance(value, str):
        return any("\ud800" <= ch <= "\udfff" for ch in value)
    if isinstance(value, dict):
        return any(_has_surrogates(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_surrogates(v) for v in value)
    return False


def _has_surrogate(value: object) -> bool:
    if isinstance(value, str):
        return any(0xD800 <= ord(c) <= 0xDFFF for c in value)
    if isinstance(value, dict):
        return any(_has_surrogate(k) or _has_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogate(v) for v in value)
    return False


def _has_nan(value: object) -> bool:
    """NaN != NaN, so a request holding one never compares equal to its own round trip."""
    if isinstance(value, float):
        return value != value
    if isinstance(value, dict):
        return any(_has_nan(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_nan(v) for v in value)
    return False


@pytest.fixture(scope="module")
def small_embedder(minilm_artifact: Path) -> Embedder:
    """A real Embedder with small limits, so oversized batches and paragraphs are cheap to make."""
    limits = Settings(max_batch_paragraphs=12, max_batch_bytes=4000, max_paragraph_bytes=600)
    return Embedder(minilm_artifact, settings=limits)


paragraph_items = (nasty_text | st.text(alphabet="ab \n\x00", min_size=590, max_size=620) | scalars
                   | st.just("A perfectly normal sentence about embeddings."))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(paragraph_items, max_size=14))
def test_embedder_gives_each_bad_paragraph_its_own_error(small_embedder: Embedder, paragraphs):
    """Per-paragraph problems (wrong type, lone surrogate, empty, over the size limit) are that
    paragraph's error; a batch over the count or byte limit is one EmbedRequestError; every
    other paragraph gets a unit vector identical to embedding it alone."""
    limits = small_embedder.settings
    encoded = [_utf8(p) for p in paragraphs if type(p) is str]
    total = sum(len(b) for b in encoded if b is not None)
    try:
        result = small_embedder.embed(paragraphs)
    except EmbedRequestError as exc:
        assert len(paragraphs) > limits.max_batch_paragraphs or total > limits.max_batch_bytes, exc
        return
    assert len(paragraphs) <= limits.max_batch_paragraphs and total <= limits.max_batch_bytes
    for p, err, vec in zip(paragraphs, result.errors, result.vectors, strict=True):
        raw = _utf8(p) if type(p) is str else None
        valid = raw is not None and p.strip() != "" and len(raw) <= limits.max_paragraph_bytes
        assert (err is None) == valid, (p, err)
        if err is None:
            np.testing.assert_allclose(np.linalg.norm(vec), 1.0, atol=1e-3)
        else:
            assert not vec.any() and isinstance(err, str) and err
    ok = [i for i, e in enumerate(result.errors) if e is None]
    if ok:  # batch invariance: the same vector as embedding the paragraph on its own
        alone = small_embedder.embed([paragraphs[ok[0]]]).vectors[0]
        np.testing.assert_allclose(result.vectors[ok[0]], alone, atol=2e-3)


def _utf8(text: str) -> bytes | None:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return None


# -- the producer's readers -------------------------------------------------------------------
good_record = st.builds(lambda i, t: json.dumps({"id": i, "text": t}), good_ids, st.text(min_size=1, max_size=40))
bad_lines = st.one_of(
    st.binary(max_size=40).filter(lambda b: b"\n" not in b),                                  # anything
    st.builds(lambda t: json.dumps({"id": "x", "text": t}), nasty_text),                      # surrogates, NUL
    st.builds(lambda v: json.dumps({"id": "y", "text": v}, default=repr), values),             # wrong types
    st.builds(lambda v: json.dumps({"id": v, "text": "ok text"}, default=repr), values),       # wrong id types
    st.builds(lambda k: json.dumps({"id": "z", "text": "t", k: 1}), st.text(max_size=5)),      # unknown fields
    st.just('{"id": "u", "text": "unterminated'), st.just("[1, 2]"), st.just('"just a string"'),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.booleans(), good_record, bad_lines), min_size=1, max_size=12))
def test_jsonl_reader_gives_one_item_per_line_and_never_raises(tmp_path_factory, lines):
    """Each non-blank line becomes exactly one Source or one InputError; every good line is a
    Source with its id and text; no Source can carry text that is not valid UTF-8."""
    path = tmp_path_factory.mktemp("jsonl") / "in.jsonl"
    raw = [(good.encode() if use_good else bad if isinstance(bad, bytes) else bad.encode("utf-8", "surrogatepass"))
           for use_good, good, bad in lines]
    path.write_bytes(b"\n".join(raw) + b"\n")
    items = list(jsonl_sources(path))
    expected = [r for r in raw if r.strip()]
    assert len(items) == len(expected)
    for item, (use_good, good, _), line in zip(items, [x for x, r in zip(lines, raw, strict=True) if r.strip()],
                                                expected, strict=True):
        assert isinstance(item, Source | InputError)
        if isinstance(item, Source):
            for block in item.blocks():
                block.text.encode("utf-8")  # never a lone surrogate past the reader
            item.id.encode("utf-8")
        else:
            assert item.reason
        if use_good:
            record = json.loads(good)
            assert isinstance(item, Source) and item.id == record["id"], (line, item)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=300) | st.text(max_size=100).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_a_text_file_is_read_whole_unless_it_holds_nul_bytes(tmp_path_factory, data):
    """No byte sequence drops a text file except NUL bytes (binary); what cannot be decoded is
    replaced and counted in a warning, never silently."""
    path = tmp_path_factory.mktemp("txt") / "f.txt"
    path.write_bytes(data)
    items = list(text_file_sources(path, "f"))
    utf16 = data.startswith((b"\xff\xfe", b"\xfe\xff"))
    if b"\0" in data and not utf16:
        assert len(items) == 1 and items[0].reason.startswith("binary file"), (data, items)
        return
    sources = [i for i in items if isinstance(i, Source)]
    assert len(sources) == 1, (data, items)
    text = "\n".join(b.text for b in sources[0].blocks())
    text.encode("utf-8")
    try:
        clean = data.decode("utf-8")
    except UnicodeDecodeError:
        clean = None
    if clean is not None and not utf16:
        assert len(items) == 1, "valid UTF-8 gets no warning"
        assert text.split() == clean.lstrip("\ufeff").split()


@settings(max_examples=200, deadline=None)
@given(st.lists(nasty_text | scalars | st.tuples(nasty_text, nasty_text | scalars), max_size=8))
def test_library_documents_become_sources_or_errors(items):
    out = list(documents_to_sources(items))
    assert len(out) == len(items)
    for item, res in zip(items, out, strict=True):
        text = item[1] if isinstance(item, tuple) else item
        if isinstance(res, Source):
            assert isinstance(text, str) and _utf8(text) is not None
            assert _utf8(res.id) is not None, "a lone surrogate in the id would crash the sink"
            list(res.blocks())
        else:
            assert isinstance(res, InputError) and res.reason


def test_a_million_tiny_records_stream_in_bounded_memory(tmp_path: Path):
    """Many tiny paragraphs: read one at a time, never held together (RSS grows far less than the
    1,000,000 Source objects would take if the reader accumulated them)."""
    path = tmp_path / "tiny.jsonl"
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(1_000_000):
            fh.write(f'{{"id": {i}, "text": "t{i % 97}"}}\n')
    proc = psutil.Process()
    before = proc.memory_info().rss
    n = peak = 0
    for item in jsonl_sources(path):
        assert isinstance(item, Source)
        n += 1
        if n % 100_000 == 0:
            peak = max(peak, proc.memory_info().rss - before)
    assert n == 1_000_000
    assert peak < 64 * 2**20, peak


# -- forged messages on a real worker's queue -------------------------------------------------
@pytest.fixture(scope="module")
def live_worker(tmp_path_factory, minilm_artifact: Path):
    root = tmp_path_factory.mktemp("props-worker")
    server = RedisServer(root / "redis").start()
    try:
        with Worker(server.url, minilm_artifact, root / "worker.log", concurrency=1, queue="props") as w:
            from deposium.worker.celery_app import create_app

            yield w, create_app(Settings(redis_url=server.url, queue="props"))
    finally:
        server.stop(kill=True)


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payloads(), st.booleans())
def test_forged_messages_on_the_queue_fail_cleanly_and_the_worker_keeps_serving(live_worker, payload, as_json):
    """Straight onto the queue (msgpack or JSON, with the producer's checks bypassed): each forged
    task ends as SUCCESS with per-paragraph errors or as one clear FAILURE, and the very same
    worker process then embeds a normal batch."""
    w, app = live_worker
    child = {c.pid for c in w.children()}
    tid = f"forged:{uuid.uuid4().hex[:10]}"
    if isinstance(payload, dict) and isinstance(payload.get("job_id"), str) and isinstance(payload.get("batch_id"),
                                                                                             str):
        tid = f"{payload['job_id']}:{payload['batch_id']}"
    kwargs = payload if isinstance(payload, dict) and all(isinstance(k, str) for k in payload) else {"x": payload}
    try:
        result = app.send_task(TASK_NAME, kwargs=kwargs, task_id=tid, serializer="json" if as_json else "msgpack")
    except Exception:  # noqa: BLE001 - not encodable by that serializer: cannot reach the queue at all
        return
    try:
        out = result.get(timeout=300)
    except (WireError, EmbedRequestError, ValueError) as exc:
        assert str(exc)
    else:
        resp = EmbedResponse.from_wire(out)
        assert resp.vectors.shape[0] == len(kwargs["paragraphs"])
    result.forget()
    ok = EmbedRequest(job_id="ok", batch_id=uuid.uuid4().hex[:8], paragraphs=["A normal paragraph."])
    resp = EmbedResponse.from_wire(app.send_task(TASK_NAME, kwargs=ok.to_wire(), task_id=ok.task_id).get(timeout=300))
    assert resp.errors == [None]
    assert {c.pid for c in w.children()} == child and w.proc.poll() is None
