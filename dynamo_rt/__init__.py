"""dynamo_rt."""

import os

# gRPC (the etcd client) installs fork handlers by default. When another thread is inside a gRPC call at
# fork time, the child can abort (SIGABRT, "epoll_wait error: Bad file descriptor") before it execs: seen as
# an embedded nats-server "exited with code -6" in the test suite, and 38 of 300 /bin/true spawns while
# etcd clients were busy. We only fork to exec (dynamo_rt.local.services), so the handlers are not needed; read by
# gRPC when it is first imported (dynamo_rt.discovery), hence here. An explicit setting is kept.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
