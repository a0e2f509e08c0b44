"""Local development tooling: everything ``dynamo-rt up`` and the tests need on one machine.

- :mod:`dynamo_rt.local.launcher`: ``dynamo-rt up``, the whole stack as child processes.
- :mod:`dynamo_rt.local.services`: embedded etcd and nats-server from their pip-installed binaries.
- :mod:`dynamo_rt.local.harness`: the one way a child process is started, watched and stopped.
- :mod:`dynamo_rt.local.commands`: the one builder of worker / frontend / planner command lines.
- :mod:`dynamo_rt.local.tinymodel`: the built-in tiny model (random Llama, byte-level BPE, chat template).

Nothing in the serving path imports this package.
"""
