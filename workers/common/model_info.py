"""What a worker publishes about its model, read from a Hugging Face model folder.

Place: the worker (``workers.main``) reads it once and hands it to the chosen engine's build function
(:class:`workers.registry.EngineSpec`); the adapters of third-party engines (vLLM, SGLang, TensorRT-LLM) read it
again from the folder they are given, and correct it from their engine's config once it has started.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workers.common.engine import ModelInfo


def model_info_from_dir(path: Path, served_name: str | None, block_size: int = 16) -> ModelInfo:
    """The model card fields of the folder ``path`` (``config.json``, ``generation_config.json`` if present);
    the name clients use is ``served_name``, else the folder's name."""
    cfg = json.loads((path / "config.json").read_text())
    gen: dict[str, Any] = {}
    if (path / "generation_config.json").is_file():
        gen = json.loads((path / "generation_config.json").read_text())
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    return ModelInfo(
        name=served_name or path.name,
        path=str(path),
        context_length=int(cfg.get("max_position_embeddings", 4096)),
        block_size=block_size,
        eos_token_ids=eos_ids,
        bos_token_id=gen.get("bos_token_id", cfg.get("bos_token_id")),
    )
