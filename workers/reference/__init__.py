"""The reference engine: our own torch engine (paged block-major KV cache, continuous batching, prefix
caching, sampling, disagg hand-off hooks). ``ReferenceEngine`` lives in ``workers.reference.engine``;
``workers.reference.flags`` is its spec for the engine registry (flags and factory; torch is imported
only when the engine is built)."""
