"""The frontend role: the OpenAI-compatible HTTP API in front of the workers (CPU only).

- :mod:`frontend.main`: the process (``dynamo-rt frontend`` / ``python -m frontend``) and its flags.
- :mod:`frontend.http1`: the HTTP/1.1 server (lean, our own; ``--http-server uvicorn`` for uvicorn).
- :mod:`frontend.app`: the HTTP routes and error mapping (FastAPI surface, raw ASGI on the token path).
- :mod:`frontend.sse`: SSE chunk templates and the writer the token path writes them through.
- :mod:`frontend.openai_protocol`: request bodies decoded, validated, mapped to sampling structs.
- :mod:`frontend.models`: discovery records -> served models, each with its preprocessor and routers.
- :mod:`frontend.preprocess`: chat template and tokenizer (no ``transformers``).
- :mod:`frontend.offload`: long prompts rendered and tokenized on a few niced threads, off the event loop.
- :mod:`frontend.serving`: the :class:`~frontend.serving.Dispatcher` (route, remote prefill, call, migrate)
  and the streamed / whole responses.
- :mod:`frontend.detok`: token ids -> text (incremental detokenization, stop strings).
- :mod:`frontend.metrics`: ``dynamo_frontend_*`` Prometheus metrics.
- :mod:`frontend.health`: the canary behind ``/health`` and ``/v1/models/{model}/ready`` (reasons when not ready).
- :mod:`frontend.pins`: stops orphaned worker calls and frees prefill pins no decode worker will take.
"""
