"""dynamo_rt: the runtime library every role builds on.

    protocol     every message between processes (discovery records, request-plane frames)
    errors       one exception tree and the HTTP status each maps to
    config       CLI flags with environment twins
    discovery/   etcd: leases, keys, watched views (the only user of grpc)
    transport    NATS: request plane, events, object store
    kv, kvhash   KV block regions and NIXL hand-off; block hashes
    router/      worker selection (round-robin ... KV-aware)
    faults       named fault-injection points for tests (a bool check when off)
    logs, metrics, heap, cpus, cli
    local/       local dev tooling: `dynamo-rt up`, embedded etcd / nats-server, the tiny model
"""
