"""The vLLM engine adapter: vLLM's ``AsyncLLM`` in the worker process, behind our Engine protocol.

``flags`` (its spec for the engine registry: flags and factory; cheap, never imports vLLM), ``engine`` (the
adapter; vLLM is imported when the engine starts), ``plugin`` (what vLLM loads in its own processes). Its KV
events are translated by ``workers.common.kv_events``.
"""
