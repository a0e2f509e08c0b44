"""The SGLang engine adapter: ``sglang.Engine`` in the worker process, behind our Engine protocol.

``flags`` (its spec for the engine registry; cheap, never imports SGLang), ``engine`` (the adapter; SGLang is imported
when the engine starts). SGLang has no CPU build: the adapter is checked against a stand-in engine here
(``tests/engines/test_sglang_standin.py``) and for real on a GPU host (``bench/gpu_engines_check.sh``).
"""
