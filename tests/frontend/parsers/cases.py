"""Real-looking outputs of each tool-call format, with the calls and content they must parse to.

Each case: the model's text, the expected content, the expected calls as (name, arguments dict). They are
written from the formats' public descriptions and chat templates (no model is downloaded here).
"""

from __future__ import annotations

from typing import Any

Case = tuple[str, str, list[tuple[str, dict[str, Any]]]]

W = ("get_weather", {"city": "Paris", "unit": "celsius"})
T = ("get_time", {})
NESTED = ("search", {"q": "a \"quoted\" }{ ] string; with <tool_call> inside", "filters": {"tags": ["x", "y"],
                                                                                            "n": 3.5}})

HERMES: list[Case] = [
    ("Hello there, no tools needed.\n", "Hello there, no tools needed.\n", []),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>',
     "", [W]),
    ('Let me check.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>', "Let me check.", [W, T]),
    ('<tool_call>\n{"name": "search", "arguments": {"q": "a \\"quoted\\" }{ ] string; with <tool_call> inside", '
     '"filters": {"tags": ["x", "y"], "n": 3.5}}}\n</tool_call>', "", [NESTED]),
    # cut off before the end marker: still a call
    ('<tool_call>\n{"name": "get_time", "arguments": {}}', "", [T]),
    # not a call: the model's text, as written
    ("Use <tool_call> tags? <tool_call>not json</tool_call> ok", "Use <tool_call> tags? <tool_call>not json"
     "</tool_call> ok", []),
    ("a < b and </tool but <tool_ca", "a < b and </tool but <tool_ca", []),
    # the end marker inside an argument string is argument text
    ('<tool_call>{"name": "search", "arguments": {"q": "x</tool_call>y", "n": 1}}</tool_call>', "",
     [("search", {"q": "x</tool_call>y", "n": 1})]),
    # the next call begins before this one's end marker
    ('<tool_call>{"name": "get_time", "arguments": {}}\n<tool_call>{"name": "get_time", "arguments": {}}'
     "</tool_call>", "", [T, T]),
    # arguments first: decoded whole at the end marker
    ('<tool_call>{"arguments": {}, "name": "get_time"}</tool_call>', "", [T]),
    ('Sure <tool_call>{"name": "get_time", "parameters": {}}</tool_call> and then more text', "Sure and then more text",
     [T]),
]

LLAMA3: list[Case] = [
    ("The answer is 42.", "The answer is 42.", []),
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', "", [W]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
     '{"name": "get_time", "parameters": {}}', "", [W, T]),
    ('  {"name": "search", "parameters": {"q": "a \\"quoted\\" }{ ] string; with <tool_call> inside", '
     '"filters": {"tags": ["x", "y"], "n": 3.5}}}', "", [NESTED]),
    ('{"not": "a call"}', '{"not": "a call"}', []),
    ('{"name": "get_time", "parameters": {}} and some words', "and some words", [T]),
    ("<|python", "<|python", []),
]

MISTRAL: list[Case] = [
    ("Plain answer [with brackets].", "Plain answer [with brackets].", []),
    ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
     '{"name": "get_time", "arguments": {}}]', "", [W, T]),
    ('I will look. [TOOL_CALLS] [{"name": "search", "arguments": {"q": "a \\"quoted\\" }{ ] string; with '
     '<tool_call> inside", "filters": {"tags": ["x", "y"], "n": 3.5}}}]', "I will look.", [NESTED]),
    ('[TOOL_CALLS]get_weather[ARGS]{"city": "Paris", "unit": "celsius"}[TOOL_CALLS]get_time[ARGS]{}', "",
     [W, T]),
    ('[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{}', "", [T]),
    ("[TOOL_CALLS]this is not a call", "[TOOL_CALLS]this is not a call", []),
    ("[TOOL_CALL", "[TOOL_CALL", []),
]

_B, _E, _CB, _CE, _S = ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
                        "<｜tool▁call▁end｜>", "<｜tool▁sep｜>")
DEEPSEEK: list[Case] = [
    ("Just text.", "Just text.", []),
    (f'{_B}{_CB}function{_S}get_weather\n```json\n{{"city": "Paris", "unit": "celsius"}}\n```{_CE}\n'
     f'{_CB}function{_S}get_time\n```json\n{{}}\n```{_CE}{_E}', "", [W, T]),
    (f'Checking now.{_B}{_CB}function{_S}search\n```json\n{{"q": "a \\"quoted\\" }}{{ ] string; with <tool_call> '
     f'inside", "filters": {{"tags": ["x", "y"], "n": 3.5}}}}\n```{_CE}{_E}', "Checking now.", [NESTED]),
    (f'{_B}{_CB}get_time{_S}{{}}{_CE}{_E}', "", [T]),  # V3.1
    (f"{_B}{_CB}function{_S}broken\n```json\nnot json\n```{_CE}{_E}",
     f"{_CB}function{_S}broken\n```json\nnot json\n```{_CE}", []),
]

PYTHONIC: list[Case] = [
    ("[1] is a citation.", "[1] is a citation.", []),
    ('[get_weather(city="Paris", unit="celsius"), get_time()]', "", [W, T]),
    ("<|python_start|>[get_weather(city='Paris', unit='celsius')]<|python_end|>", "", [W]),
    ('[search(q="a \\"quoted\\" }{ ] string; with <tool_call> inside", filters={"tags": ["x", "y"], "n": 3.5})]',
     "", [NESTED]),
    ("[get_time()] Done.", "Done.", [T]),
    ("[print(open('x'))]", "[print(open('x'))]", []),
    ("Answer: [get_time()]", "Answer: [get_time()]", []),
]

CASES: dict[str, list[Case]] = {
    "hermes": HERMES,
    "llama3_json": LLAMA3,
    "mistral": MISTRAL,
    "deepseek_v3": DEEPSEEK,
    "pythonic": PYTHONIC,
}

# Reasoning: text, expected reasoning, expected content.
REASONING: dict[str, list[tuple[str, str, str]]] = {
    "deepseek_r1": [
        ("<think>\nLet me think.\n</think>\n\nThe answer.", "\nLet me think.\n", "\n\nThe answer."),
        ("Already thinking (the template opened it)</think>Answer", "Already thinking (the template opened it)",
         "Answer"),
        ("Cut off before the end of thinking </thi", "Cut off before the end of thinking </thi", ""),
        ("a < b </think> c", "a < b ", " c"),
    ],
    "qwen3": [
        ("<think>\nHmm.\n</think>\n\nAnswer <think> stays.", "\nHmm.\n", "\n\nAnswer <think> stays."),
        ("No thinking here.", "", "No thinking here."),
        ("<thinking is a word", "", "<thinking is a word"),
        ("  <think>x</think>y", "x", "y"),
        ("<think>never closed", "never closed", ""),
    ],
}
