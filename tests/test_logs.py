"""The access log: buffered, flushed on time, on size and at shutdown; the same shape as other lines."""

from __future__ import annotations

import asyncio
import io
import json
import logging

from hypothesis import given
from hypothesis import strategies as st

from signing_proxy.logs import ACCESS_FIELDS, AccessLog, AccessValues, JsonFormatter, json_members

FIELDS = {"request_id": "r1", "status": 200, "route": "/api/v3/{id}", "error": None}


async def test_lines_are_buffered_then_written_within_flush_seconds() -> None:
    stream = io.StringIO()
    log = AccessLog("json", stream)
    log(FIELDS)
    log({**FIELDS, "request_id": "r2"})
    assert stream.getvalue() == ""  # nothing written per request
    await asyncio.sleep(AccessLog.FLUSH_SECONDS * 3)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["request_id"] for line in lines] == ["r1", "r2"]
    assert lines[0]["logger"] == "signing_proxy.access" and lines[0]["level"] == "info"
    assert lines[0]["status"] == 200 and lines[0]["error"] is None and lines[0]["ts"].endswith("Z")


async def test_full_buffer_is_written_at_once_and_flush_writes_the_rest() -> None:
    stream = io.StringIO()
    log = AccessLog("json", stream)
    for i in range(AccessLog.FLUSH_LINES + 3):
        log({**FIELDS, "request_id": str(i)})
    assert len(stream.getvalue().splitlines()) == AccessLog.FLUSH_LINES
    log.flush()  # what shutdown does
    assert len(stream.getvalue().splitlines()) == AccessLog.FLUSH_LINES + 3


def test_without_a_loop_lines_are_written_at_once() -> None:
    stream = io.StringIO()
    AccessLog("text", stream)(FIELDS)
    line = stream.getvalue()
    assert " INFO    signing_proxy.access: request request_id=r1 status=200 " in line


def test_json_shape_matches_the_formatter() -> None:
    stream = io.StringIO()
    AccessLog("json", stream)(FIELDS)
    ours = json.loads(stream.getvalue())
    record = logging.LogRecord(
        "signing_proxy.access", logging.INFO, __file__, 1, "request", None, None
    )
    record.fields = FIELDS
    theirs = json.loads(JsonFormatter().format(record))
    assert list(ours) == list(theirs)
    assert {k: v for k, v in ours.items() if k != "ts"} == {
        k: v for k, v in theirs.items() if k != "ts"
    }


def test_broken_stream_does_not_raise() -> None:
    stream = io.StringIO()
    stream.close()
    log = AccessLog("json", stream)
    log(FIELDS)
    log.flush()


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=6,
)


@given(st.dictionaries(st.text(), JSON_VALUES, max_size=8))
def test_json_members_is_exactly_what_json_dumps_writes(fields: dict[str, object]) -> None:
    # The access line's fast renderer must produce json.dumps's bytes: same escaping of client
    # text (quotes, control characters, non-ASCII, lone surrogates), same numbers.
    assert "{" + json_members(fields) + "}" == json.dumps(fields, default=str)


TEXT = st.text(max_size=20)
OPTIONAL = st.none() | TEXT
MS = st.floats(0, 1e6, allow_nan=False).map(lambda x: round(x, 3))


ACCESS_VALUES = st.tuples(
    TEXT, TEXT, TEXT, TEXT, TEXT, OPTIONAL, st.integers(0, 999), OPTIONAL,
    st.integers(0, 2**40), st.integers(0, 5), MS, MS, MS, OPTIONAL,
)  # fmt: skip


@given(ACCESS_VALUES)
def test_request_line_is_the_general_line(values: AccessValues) -> None:
    # The per-request template writes byte for byte what the dict rendering writes (timestamps
    # aside), so a client's path with quotes or control characters is escaped the same way.
    template, general = io.StringIO(), io.StringIO()
    AccessLog("json", template).request(values)
    AccessLog("json", general)(dict(zip(ACCESS_FIELDS, values, strict=True)))
    ours, theirs = template.getvalue(), general.getvalue()
    assert ours.partition('"level"')[2] == theirs.partition('"level"')[2]
    assert json.loads(ours)["path"] == values[4]
