"""The TensorRT-LLM engine adapter: its LLM API in the worker process, behind our Engine protocol.

``flags`` (its spec for the engine registry; cheap, never imports TensorRT-LLM), ``engine`` (the adapter;
TensorRT-LLM is imported when the engine starts). TensorRT-LLM has no installable wheel on CPU hosts: the
adapter is checked against stand-in API objects here (``tests/engines/test_trtllm_standin.py``) and for real on
a GPU host (``bench/gpu_engines_check.sh``).
"""
