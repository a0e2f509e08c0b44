"""The reference engine: our own torch engine (paged block-major KV cache, continuous batching, prefix
caching, sampling, disagg hand-off hooks). ``ReferenceEngine`` lives in ``workers.reference.engine``;
``workers.reference.flags`` wires it to the worker CLI."""
