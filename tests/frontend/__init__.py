"""Tests of the frontend package, and the tokenizer folders they share.

Besides the project's tiny model (ChatML template, no BOS), the preprocessing and detokenization tests need
other Hugging Face template styles, so this module builds small byte-level BPE tokenizers in the layouts
real models ship:

* ``chatml``: Qwen-like. No BOS, no post-processor in tokenizer.json (transformers then installs an empty
  one), ``<|im_end|>`` as EOS, ``config.json`` gives the context length, template in
  ``chat_template.jinja``.
* ``llama3``: Llama-3-like. BOS added by the tokenizer.json post-processor (so completions get it) and
  written by the template (so chats must not get it twice), header-id tokens, ``{% generation %}`` blocks,
  ``strftime_now``, ``raise_exception``, ``loopcontrols``, special tokens given as AddedToken dicts,
  extra EOS ids in generation_config.json.
* ``inst``: Llama-2-like. ``add_bos_token: true`` with no post-processor in tokenizer.json (transformers
  builds one from the flag), the legacy ``special_tokens_map.json`` (no ``added_tokens_decoder``), and a
  template that handles list-valued content itself.

The training text is generated here (a fixed word list in several scripts, fixed seed) so the vocabulary
has merges for accented, CJK and emoji text as well as single-byte fallbacks.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

_WORDS = (
    "the harbour boats came back one by one and every crew sorted the catch into crates of ice while gulls "
    "argued about the weather a small library stood at the end of the lane with three rooms and a cat named "
    "pepper who slept on the atlas table bread needs flour water salt yeast and patience trains leave the "
    "station at seven tomorrow morning please call me when you arrive I will bring the maps and a thermos"
).split()
_UNICODE = (
    "café", "naïve", "crème brûlée", "façade", "jalapeño", "Zürich", "smörgåsbord", "déjà vu", "Ångström",
    "日本語", "東京", "中文测试", "漢字", "こんにちは", "ありがとう", "한국어", "안녕하세요", "Привет",
    "мир", "Ελληνικά", "עברית", "العربية", "हिन्दी", "ไทย",
    "😀", "🚀", "👍🏽", "👨‍👩‍👧", "🇯🇵", "❤️", "∑", "≠", "€", "£",
)


def training_lines(n: int = 400, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        k = rng.randint(6, 18)
        words = [rng.choice(_WORDS) if rng.random() < 0.7 else rng.choice(_UNICODE) for _ in range(k)]
        line = " ".join(words)
        lines.append(line[0].upper() + line[1:] + rng.choice((".", "!", "?", ",", ":")))
    return lines


def train_bpe(special_tokens: list[str], vocab_size: int = 700) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_lines(), trainer)
    return tok


def _dump(path: Path, data: object) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False), encoding="utf-8")


def _added_tokens_decoder(tok: Tokenizer, names: list[str]) -> dict[str, object]:
    return {
        str(tok.token_to_id(t)): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
            "special": True,
        }
        for t in names
    }


CHATML_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\nTools:\\n' }}{%- for t in tools %}{{- t | tojson + '\\n' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}{%- endif %}\n"
    "{%- for message in messages %}\n"
    "{%- if message.role == 'assistant' and message.tool_calls is defined %}\n"
    "{{- '<|im_start|>assistant\\n' }}{%- if message.content %}{{- message.content + '\\n' }}{%- endif %}\n"
    "{%- for call in message.tool_calls %}"
    "{{- '<tool_call>' + {'name': call.function.name, 'arguments': call.function.arguments} | tojson"
    " + '</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}\n"
    "{%- elif message.role == 'tool' %}\n"
    "{{- '<|im_start|>tool\\n' + message.tool_call_id + ': ' + message.content + '<|im_end|>\\n' }}\n"
    "{%- else %}\n"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}\n"
)

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "You are a helpful assistant." %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + strftime_now("%d %b %Y") + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role == 'developer' %}{% continue %}{% endif %}
    {%- if message.role not in ['user', 'assistant', 'tool'] %}
        {{- raise_exception('Unsupported role: ' + message.role) }}
    {%- endif %}
    {%- set role = 'ipython' if message.role == 'tool' else message.role %}
    {{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' }}
    {%- if message.role == 'assistant' %}
        {%- generation %}
        {%- if message.tool_calls is defined %}
            {{- message.tool_calls[0].function | tojson }}
        {%- else %}
            {{- message['content'] | trim }}
        {%- endif %}
        {%- endgeneration %}
    {%- else %}
        {{- message['content'] | trim }}
    {%- endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

INST_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set body = message['content'] %}"
    "{%- else %}{%- set body = message['content'] | map(attribute='text') | join(' ') %}{%- endif %}"
    "{%- if message['role'] == 'user' %}{{ bos_token + '[INST] ' + body | trim + ' [/INST]' }}"
    "{%- elif message['role'] == 'system' %}{{ '<<SYS>>\\n' + body | trim + '\\n<</SYS>>\\n\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{ ' ' + body | trim + ' ' + eos_token }}"
    "{%- else %}{{ raise_exception('Only user, system and assistant roles are supported!') }}"
    "{%- endif %}{%- endfor %}"
)


def build_chatml(out: Path) -> Path:
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = train_bpe(names)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    _dump(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": _added_tokens_decoder(tok, names),
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 32768,
        "clean_up_tokenization_spaces": False,
    })
    (out / "chat_template.jinja").write_text(CHATML_TEMPLATE, encoding="utf-8")
    _dump(out / "config.json", {"model_type": "qwen2", "max_position_embeddings": 1024, "vocab_size": 768})
    _dump(out / "generation_config.json", {"eos_token_id": [tok.token_to_id("<|im_end|>"),
                                                            tok.token_to_id("<|endoftext|>")]})
    return out


def build_llama3(out: Path) -> Path:
    names = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tok = train_bpe(names)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)],
    )
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))

    def added(t: str) -> dict[str, object]:
        return {"__type": "AddedToken", "content": t, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    _dump(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": _added_tokens_decoder(tok, names),
        "bos_token": added("<|begin_of_text|>"),
        "eos_token": added("<|eot_id|>"),
        "model_max_length": 131072,
        "chat_template": LLAMA3_TEMPLATE,
    })
    _dump(out / "generation_config.json", {"bos_token_id": bos, "eos_token_id": [
        tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>")]})
    return out


def build_inst(out: Path) -> Path:
    names = ["<unk>", "<s>", "</s>"]
    tok = train_bpe(names)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))  # no post-processor: transformers builds one from add_bos_token
    _dump(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": 4096,
        "chat_template": [{"name": "default", "template": INST_TEMPLATE}],
    })
    _dump(out / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    return out


BUILDERS = {"chatml": build_chatml, "llama3": build_llama3, "inst": build_inst}


def tokenizer_dir(kind: str, root: Path) -> Path:
    """A model folder of the given kind: ``tiny`` (the project's tiny model) or one of :data:`BUILDERS`."""
    if kind == "tiny":
        from dynamo_rt.local.tinymodel import ensure_tiny_model

        return ensure_tiny_model()
    return BUILDERS[kind](root / kind)
