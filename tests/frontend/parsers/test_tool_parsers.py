"""Every tool-call parser against real-looking outputs: split at every character offset and at random
multi-split points, the streamed result (content and calls) equals the non-streamed one, which equals the
expected parse, and no marker or prefix of one ever reaches content when the text held a call."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frontend.parsers import TOOL_PARSERS, ToolCall, ToolParser, tool_parser
from frontend.parsers.base import ToolCallDelta, assemble
from tests.frontend.parsers.cases import CASES, Case

ALL = [(name, i, case) for name, cases in CASES.items() for i, case in enumerate(cases)]
IDS = [f"{name}-{i}" for name, i, _ in ALL]


def stream(cls: type[ToolParser], chunks: list[str]) -> tuple[list[str], list[ToolCall]]:
    p = cls()
    deltas: list[str] = []
    calls: list[ToolCallDelta] = []
    for c in chunks:
        out = p.feed(c)
        deltas.append(out.content)
        calls += out.calls
    end = p.finish()
    deltas.append(end.content)
    calls += end.calls
    return deltas, assemble(calls)


def as_pairs(calls: list[ToolCall]) -> list[tuple[str, dict[str, Any]]]:
    return [(c.name, json.loads(c.arguments)) for c in calls]


def check_stream(name: str, case: Case, chunks: list[str]) -> None:
    text, _content, calls = case
    cls = tool_parser(name)
    whole = cls().parse(text)
    deltas, got_calls = stream(cls, chunks)
    assert "".join(deltas) == whole.content
    assert got_calls == assemble(whole.calls)
    if calls:
        # No delta may end with a marker prefix the call then completed, nor hold a marker.
        for d in deltas:
            for m in cls.markers:
                assert m not in d


@pytest.mark.parametrize(("name", "i", "case"), ALL, ids=IDS)
def test_whole_text_parses_as_expected(name: str, i: int, case: Case) -> None:
    text, content, calls = case
    out = tool_parser(name)().parse(text)
    assert out.content == content
    assert as_pairs(assemble(out.calls)) == calls
    if calls:
        for m in tool_parser(name).markers:
            assert m not in out.content


@pytest.mark.parametrize(("name", "i", "case"), ALL, ids=IDS)
def test_every_split_offset_streams_the_same(name: str, i: int, case: Case) -> None:
    text = case[0]
    for k in range(len(text) + 1):
        check_stream(name, case, [text[:k], text[k:]])
    check_stream(name, case, list(text))  # one character per delta


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_random_multi_splits_stream_the_same(data: st.DataObject) -> None:
    name, _, case = data.draw(st.sampled_from(ALL))
    text = case[0]
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    check_stream(name, case, [text[a:b] for a, b in itertools.pairwise(bounds)])


def test_every_name_is_registered() -> None:
    assert set(CASES) <= set(TOOL_PARSERS)
    with pytest.raises(Exception, match="unknown tool-call parser"):
        tool_parser("nope")


def test_content_is_released_before_the_end_when_no_marker_can_start() -> None:
    # The hold-back only keeps what may still be a marker: ordinary text streams at once.
    p = tool_parser("hermes")()
    assert p.feed("Hello wor").content == "Hello wor"
    assert p.feed("ld <tool").content == "ld"  # " " held (may precede a call), "<tool" may be a marker
    assert p.feed("box> ok").content == " <toolbox> ok"


def test_hermes_and_deepseek_arguments_stream_as_written() -> None:
    p = tool_parser("hermes")()
    out = p.feed('Hi <tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa')
    assert out.content == "Hi"
    assert out.calls == [ToolCallDelta(0, "get_weather", '{"city": "Pa')]
    # "</tool_c" may be the end marker: held back until the next delta shows it is string text.
    assert p.feed('ris", "note": "a </tool_c').calls == [ToolCallDelta(0, None, 'ris", "note": "a ')]
    assert p.feed('all> b"}}\n</tool_call>').calls == [ToolCallDelta(0, None, '</tool_call> b"}')]
    assert not p.finish()
    ds = tool_parser("deepseek_v3")()
    out = ds.feed("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{\"a\": [1,")
    assert out.calls == [ToolCallDelta(0, "f", '{"a": [1,')]


def test_a_streaming_call_cut_off_keeps_what_it_has() -> None:
    # Announced calls stay calls: their arguments are what the model wrote (OpenAI's own arguments may be
    # invalid JSON too), streamed or not.
    text = '<tool_call>{"name": "get_time", "arguments": {"tz": "UT</tool_call> after'
    whole = tool_parser("hermes")().parse(text)
    assert assemble(whole.calls) == [ToolCall("get_time", '{"tz": "UT</tool_call> after')]  # inside a string
    text = '<tool_call>{"name": "get_time", "arguments": {"tz": 1</tool_call> after'
    whole = tool_parser("hermes")().parse(text)
    assert assemble(whole.calls) == [ToolCall("get_time", '{"tz": 1')] and whole.content == "after"
    for k in range(len(text) + 1):
        deltas, calls = stream(tool_parser("hermes"), [text[:k], text[k:]])
        assert calls == assemble(whole.calls) and "".join(deltas) == "after"


@settings(max_examples=2000, deadline=None)
@given(buf=st.text(alphabet="<>/tool_ca[]TOLCS a", max_size=16))
def test_releasable_holds_exactly_the_longest_marker_prefix(buf: str) -> None:
    from frontend.parsers.base import releasable

    markers = ("<tool_call>", "</tool_call>", "<<a<<", "[TOOL_CALLS]")
    keep = max((k for m in markers for k in range(1, min(len(m) - 1, len(buf)) + 1) if buf.endswith(m[:k])),
               default=0)
    assert releasable(buf, markers) == len(buf) - keep


def test_llama3_arguments_stream_as_written() -> None:
    p = tool_parser("llama3_json")()
    out = p.feed('<|python_tag|>{"name": "search", "parameters": {"q": "a;b')
    assert out.content == "" and out.calls == [ToolCallDelta(0, "search", '{"q": "a;b')]
    assert p.feed('"}}; {"name": "get_time", "parameters": {}}').calls == [
        ToolCallDelta(0, None, '"}'), ToolCallDelta(1, "get_time", "{}")]
    assert not p.finish()
    cut = tool_parser("llama3_json")().parse('{"name": "search", "parameters": {"q": "a')
    assert assemble(cut.calls) == [ToolCall("search", '{"q": "a')] and cut.content == ""


def test_mistral_named_form_streams_its_arguments() -> None:
    p = tool_parser("mistral")()
    out = p.feed('[TOOL_CALLS]get_weather[ARGS]{"city": "Pa')
    assert out.calls == [ToolCallDelta(0, "get_weather", '{"city": "Pa')]
    assert p.feed('ris"}[TOOL_CALLS]get_time[ARGS]{}').calls == [ToolCallDelta(0, None, 'ris"}'),
                                                                 ToolCallDelta(1, "get_time", "{}")]
