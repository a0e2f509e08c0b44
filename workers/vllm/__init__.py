"""The vLLM engine adapter: vLLM's ``AsyncLLM`` in the worker process, behind our Engine protocol.

``flags`` (imported by every worker CLI, so it never imports vLLM), ``engine`` (the adapter; vLLM is imported
when the engine starts), ``kv_events`` (vLLM block hashes -> our chained hashes for the KV router).
"""
