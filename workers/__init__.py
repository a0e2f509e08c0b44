"""The worker role: one process serves one engine (or several mocker engines) behind the worker runtime.

``main`` (the process: ``dynamo-rt worker`` / ``python -m workers``; the worker's own flags), ``registry`` (the
engines, each an :class:`~workers.registry.EngineSpec`: its flags and build function), ``common`` (what every
engine shares: the :class:`~workers.common.engine.Engine` protocol and its optional abilities, the runtime that
registers and serves an engine, NIXL KV hand-off, KV event translation, model info), and one folder per engine:
``reference`` (our torch engine), ``mocker`` (simulated), ``vllm``, ``sglang``, ``trtllm`` (adapters).
"""
