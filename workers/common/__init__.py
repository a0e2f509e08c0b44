"""What every engine worker shares.

``engine`` (the Engine protocol, its optional abilities, ModelInfo), ``runtime`` (registration in etcd, the NATS
endpoints, KV events and load metrics around one engine), ``kv_handoff`` (NIXL hand-off of an engine's own KV
pool), ``kv_events`` (third-party engines' KV events -> our block hashes), ``gpu_flags`` (flags the vLLM / SGLang
/ TRT-LLM adapters share), ``model_info`` (the model card from an HF folder), ``net`` (this host's address),
``live_gauges`` (engine state read at scrape time: blocks in use, requests held, pins).
No module here imports an engine.
"""
