"""Reasoning parsers: the expected split, and the same split however the text is cut into stream deltas;
no ``<think>`` / ``</think>`` (or the start of one) leaks into content or reasoning around a real block."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from frontend.parsers import REASONING_PARSERS, reasoning_parser
from tests.frontend.parsers.cases import REASONING

ALL = [(name, text, r, c) for name, cases in REASONING.items() for text, r, c in cases]
IDS = [f"{a[0]}-{i}" for i, a in enumerate(ALL)]


def stream(name: str, chunks: list[str]) -> tuple[str, str]:
    p = reasoning_parser(name)()
    r = c = ""
    for ch in chunks:
        out = p.feed(ch)
        r, c = r + out.reasoning, c + out.content
    out = p.finish()
    return r + out.reasoning, c + out.content


@pytest.mark.parametrize(("name", "text", "reasoning", "content"), ALL, ids=IDS)
def test_split_as_expected_at_every_offset(name: str, text: str, reasoning: str, content: str) -> None:
    whole = reasoning_parser(name)().parse(text)
    assert (whole.reasoning, whole.content) == (reasoning, content)
    for k in range(len(text) + 1):
        assert stream(name, [text[:k], text[k:]]) == (reasoning, content)
    assert stream(name, list(text)) == (reasoning, content)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_random_multi_splits(data: st.DataObject) -> None:
    name, text, reasoning, content = data.draw(st.sampled_from(ALL))
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=10)))
    bounds = [0, *cuts, len(text)]
    assert stream(name, [text[a:b] for a, b in itertools.pairwise(bounds)]) == (reasoning, content)


def test_names() -> None:
    assert set(REASONING) == set(REASONING_PARSERS)
    with pytest.raises(Exception, match="unknown reasoning parser"):
        reasoning_parser("nope")


def test_reasoning_streams_before_the_block_closes() -> None:
    p = reasoning_parser("deepseek_r1")()
    assert p.feed("Thinking hard <").reasoning == "Thinking hard "  # "<" may start </think>
    out = p.feed("/think>Done")
    assert (out.reasoning, out.content) == ("", "Done")
