#!/usr/bin/env bash
# `make compose-check`: build the cpu image and run docker-compose.yml's disaggregated stack the way a user
# would meet it, then prove one request went prefill -> decode with its KV cache pulled over NIXL between the
# two worker containers (a worker counter, not a log line), and tear everything down.
#
#   scripts/compose-check.sh            the whole check (CI runs it after `make test`)
#   scripts/compose-check.sh --build    only the engine, the base images and the cpu image (`make image` uses it
#                                       on machines that cannot pull)
#
# What it does, printing each step:
#   1. a Docker engine: when none answers, installs Debian's docker.io / docker-compose / debootstrap (apt) and
#      starts dockerd in the background (log: .state/compose-check/dockerd.log);
#   2. base images: pulled when the registry is reachable; otherwise local STAND-INS, each with "standin" in its
#      tag: a Python 3.11 bookworm base made with debootstrap (Debian's python3 is 3.11) that trusts the host's
#      extra CA certificates (/usr/local/share/ca-certificates: pip inside the build reaches PyPI through them),
#      and etcd / NATS images made from the cpu image's own etcd and nats-server binaries, put in place by the
#      compose override file docker-compose.standins.yml;
#   3. the cpu image (Dockerfile target cpu; on a stand-in base the CPU torch wheel from the host pip's
#      find-links folder is copied into docker/wheels/ and torch is taken from PyPI + that wheel), its size;
#   4. `docker-compose --profile disagg up`, /health, the README's curl, a streamed openai-SDK request, the
#      workers' metrics, the NIXL hand-off figures (scripts/compose_probe.py), `docker-compose down -v`.
# Tool: Debian's docker-compose 1.29 (the Python v1 tool; this docker CLI has no compose plugin), overridable
# with COMPOSE="docker compose". Traffic goes only to 127.0.0.1 and the project's own bridge network.
set -euo pipefail
cd "$(dirname "$0")/.."

STATE=.state/compose-check
mkdir -p "$STATE"
PROJECT=${COMPOSE_PROJECT:-dynamo-rt-check}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
CPU_IMAGE="dynamo-rt:${VERSION}-cpu"
PYTHON_IMAGE=$(sed -n 's/^ARG PYTHON_IMAGE=//p' Dockerfile)
STANDIN_PYTHON="dynamo-rt-standin/python:3.11-bookworm"
STANDIN_ETCD="dynamo-rt-standin/etcd:from-${VERSION}-cpu"
STANDIN_NATS="dynamo-rt-standin/nats:from-${VERSION}-cpu"
MAX_IMAGE_BYTES=$((2500 * 1000 * 1000))
CA_DIR=/usr/local/share/ca-certificates
# The legacy builder: Debian's dockerd 20.10 has no buildx, and BuildKit would fetch its Dockerfile frontend
# from a registry.
export DOCKER_BUILDKIT=0 COMPOSE_DOCKER_CLI_BUILD=0
# Debian's client matches Debian's dockerd; another client on PATH may expect a newer API or buildx.
DOCKER=${DOCKER:-$( [ -x /usr/bin/docker ] && echo /usr/bin/docker || echo docker )}
COMPOSE=${COMPOSE:-docker-compose}
T0=$(date +%s)

say() { printf '[compose-check %4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die() { say "FAIL: $*"; exit 1; }

ensure_engine() {
    if "$DOCKER" info >/dev/null 2>&1; then
        say "docker engine: running ($("$DOCKER" version --format '{{.Server.Version}}'))"
        return
    fi
    if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null \
            || ! command -v docker-compose >/dev/null; then
        say "docker engine: installing Debian's docker.io, docker-compose and debootstrap (apt-get)"
        apt-get update -q >"$STATE/apt.log" 2>&1
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker.io docker-compose debootstrap \
            >>"$STATE/apt.log" 2>&1 || die "apt-get install failed, see $STATE/apt.log"
        [ -x /usr/bin/docker ] && DOCKER=/usr/bin/docker
    fi
    say "docker engine: starting dockerd in the background (log $STATE/dockerd.log)"
    nohup dockerd >"$STATE/dockerd.log" 2>&1 &
    for _ in $(seq 60); do
        "$DOCKER" info >/dev/null 2>&1 && { say "docker engine: up"; return; }
        sleep 1
    done
    die "dockerd did not answer within 60 s, see $STATE/dockerd.log"
}

# Whether an image is here or can be pulled (a short timeout: an unreachable registry hangs, not fails).
have_or_pull() {
    "$DOCKER" image inspect "$1" >/dev/null 2>&1 && return 0
    timeout 60 "$DOCKER" pull -q "$1" >/dev/null 2>&1
}

ca_digest() { cat "$CA_DIR"/*.crt 2>/dev/null | sha256sum | cut -c1-12; }

standin_python() {
    local digest; digest=$(ca_digest)
    if [ "$("$DOCKER" image inspect -f '{{index .Config.Labels "dynamo-rt.standin.ca"}}' "$STANDIN_PYTHON" \
            2>/dev/null)" = "$digest" ]; then
        say "base image: STAND-IN $STANDIN_PYTHON (present)"
        return
    fi
    say "base image: building STAND-IN $STANDIN_PYTHON with debootstrap (Debian bookworm, python3 3.11)"
    local root="$STATE/rootfs"
    rm -rf "$root"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$root" \
        http://deb.debian.org/debian >"$STATE/debootstrap.log" 2>&1 || die "debootstrap failed, see $STATE/debootstrap.log"
    # The host's extra CA certificates, so HTTPS to PyPI verifies inside the build as it does on the host.
    if compgen -G "$CA_DIR/*.crt" >/dev/null; then
        cp "$CA_DIR"/*.crt "$root$CA_DIR/"
        chroot "$root" update-ca-certificates >/dev/null
    fi
    # python / pip on PATH as in the python:3.11 images: a venv at /usr/local (pip installs there as root).
    chroot "$root" python3 -m venv /usr/local
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -c . | "$DOCKER" import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
        --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
        --change "LABEL dynamo-rt.standin.ca=$digest" \
        --change 'CMD ["python3"]' - "$STANDIN_PYTHON" >/dev/null
    rm -rf "$root"
    say "base image: STAND-IN $STANDIN_PYTHON built"
}

build_cpu() {
    local args=() base="$PYTHON_IMAGE"
    if have_or_pull "$PYTHON_IMAGE"; then
        say "base image: $PYTHON_IMAGE"
    else
        say "base image: $PYTHON_IMAGE cannot be pulled"
        standin_python
        base=$STANDIN_PYTHON
        # PyTorch's index is out of reach too: the host pip's CPU torch wheel, offered through docker/wheels/.
        local links wheel
        links=$(pip config list 2>/dev/null | sed -n "s/^.*find-links='\(.*\)'$/\1/p" | head -1)
        wheel=$(ls "${links:-/nonexistent}"/torch-2.13.0+cpu-cp311-*.whl 2>/dev/null | head -1 || true)
        if [ -n "$wheel" ]; then
            cp -u "$wheel" docker/wheels/
            args+=(--build-arg TORCH_INDEX_URL=https://pypi.org/simple)
            say "torch: $(basename "$wheel") from $links (copied to docker/wheels/), other wheels from PyPI"
        fi
    fi
    say "building $CPU_IMAGE (Dockerfile target cpu, log $STATE/build.log)"
    local t=$(date +%s)
    "$DOCKER" build --force-rm --target cpu -t "$CPU_IMAGE" --build-arg "PYTHON_IMAGE=$base" "${args[@]}" . \
        >"$STATE/build.log" 2>&1 || { tail -30 "$STATE/build.log"; die "docker build failed"; }
    local size; size=$("$DOCKER" image inspect -f '{{.Size}}' "$CPU_IMAGE")
    say "built $CPU_IMAGE in $(( $(date +%s) - t )) s: $(( size / 1000000 )) MB"
    [ "$size" -le "$MAX_IMAGE_BYTES" ] || die "$CPU_IMAGE is $(( size / 1000000 )) MB, over 2500 MB"
    echo "$(( $(date +%s) - t )) $size" >"$STATE/build-figures"
}

# etcd and NATS: their images when they can be pulled, else stand-ins from the cpu image's own binaries.
OVERRIDE=()
standin_services() {
    local etcd_image nats_image
    etcd_image=$(python3 -c "import yaml,sys; print(yaml.safe_load(open('docker-compose.yml'))['services']['etcd']['image'])" 2>/dev/null \
        || sed -n 's/^    image: \(.*etcd.*\)$/\1/p' docker-compose.yml | head -1)
    nats_image=$(sed -n 's/^    image: \(nats:.*\)$/\1/p' docker-compose.yml | head -1)
    if have_or_pull "$etcd_image" && have_or_pull "$nats_image"; then
        say "etcd / NATS images: $etcd_image, $nats_image"
        return
    fi
    say "etcd / NATS images cannot be pulled: STAND-INS $STANDIN_ETCD, $STANDIN_NATS (from $CPU_IMAGE)"
    # The paths the real images use, so docker-compose.yml's commands and health checks run unchanged.
    printf 'FROM %s\nUSER root\nRUN ln -s /opt/dynamo-rt/bin/etcd /usr/local/bin/etcd && ln -s /opt/dynamo-rt/bin/etcdctl /usr/local/bin/etcdctl\nENTRYPOINT []\n' \
        "$CPU_IMAGE" | "$DOCKER" build -q -t "$STANDIN_ETCD" - >/dev/null
    printf 'FROM %s\nUSER root\nENTRYPOINT ["/opt/dynamo-rt/bin/nats-server"]\nCMD []\n' \
        "$CPU_IMAGE" | "$DOCKER" build -q -t "$STANDIN_NATS" - >/dev/null
    OVERRIDE=(-f docker-compose.standins.yml)
}

leftovers() {
    "$DOCKER" ps -a --filter "label=com.docker.compose.project=$PROJECT" -q
    "$DOCKER" volume ls --filter "label=com.docker.compose.project=$PROJECT" -q
    "$DOCKER" network ls --filter "label=com.docker.compose.project=$PROJECT" -q
    "$DOCKER" images -q --filter dangling=true --filter label=org.opencontainers.image.title=dynamo-rt
}

ensure_engine
build_cpu
[ "${1:-}" = "--build" ] && exit 0
standin_services

DC=($COMPOSE -p "$PROJECT" -f docker-compose.yml "${OVERRIDE[@]}" -f docker-compose.check.yml --profile disagg)
cleanup() {
    local rc=$?
    if [ $rc -ne 0 ]; then
        say "logs of the failed run: $STATE/compose.log"
        "${DC[@]}" logs --no-color >"$STATE/compose.log" 2>&1 || true
    fi
    "${DC[@]}" down -v --remove-orphans >"$STATE/down.log" 2>&1 || true
    exit $rc
}
trap cleanup EXIT

say "starting: ${DC[*]} up -d"
t_up=$(date +%s)
"${DC[@]}" up -d --no-build >"$STATE/up.log" 2>&1 || { cat "$STATE/up.log"; die "compose up failed"; }
for _ in $(seq 300); do
    curl -fsS -o /dev/null http://127.0.0.1:8000/health 2>/dev/null && break
    sleep 1
done
curl -fsS -o /dev/null http://127.0.0.1:8000/health || die "/health not 200 after 300 s"
# Both workers registered (their health checks pass once the metrics server is up, i.e. after registration)
# and the check's second frontend answering.
for _ in $(seq 300); do
    states=$(for s in prefill decode; do "$DOCKER" inspect -f '{{.State.Health.Status}}' "$("${DC[@]}" ps -q "$s")"; done)
    [ "$(echo $states)" = "healthy healthy" ] && curl -fsS -o /dev/null http://127.0.0.1:8001/health 2>/dev/null && break
    sleep 1
done
[ "$(echo $states)" = "healthy healthy" ] || die "workers not healthy after 300 s: $states"
up_s=$(( $(date +%s) - t_up ))
say "frontend /health 200 after ${up_s} s (compose up -> ready)"

# The README's curl (its "Containers" section), as a user types it.
readme_curl=$(sed -n '/^## Containers/,/^## [^C]/p' README.md | grep -m1 '^curl ')
[ -n "$readme_curl" ] || die "no curl line in the README's Containers section"
bash -c "$readme_curl" >"$STATE/readme-curl.json" || die "the README's curl failed: $readme_curl"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["choices"][0]["message"]["content"], d' \
    "$STATE/readme-curl.json" || die "the README's curl gave no completion: $(cat "$STATE/readme-curl.json")"
say "README curl: $(head -c 160 "$STATE/readme-curl.json")"

# Streamed openai-SDK requests, the workers' counters, the hand-off figures.
PROBE_PY=${PROBE_PY:-.venv/bin/python}
"$PROBE_PY" scripts/compose_probe.py --compose "${DC[*]}" --up-seconds "$up_s" \
    --build-figures "$STATE/build-figures" || die "probe failed"

say "docker-compose down -v"
"${DC[@]}" down -v --remove-orphans >"$STATE/down.log" 2>&1 || die "compose down failed"
trap - EXIT
# Dangling layers of our own earlier builds (final stages carry our OCI title, stand-in-based stages the
# stand-in's label); other images on the machine are not touched.
"$DOCKER" image prune -f --filter label=org.opencontainers.image.title=dynamo-rt >/dev/null
"$DOCKER" image prune -f --filter label=dynamo-rt.standin.ca >/dev/null
left=$(leftovers)
[ -z "$left" ] || die "left behind after down: $left"
say "OK: nothing of project $PROJECT left (containers, volumes, networks); total $(( $(date +%s) - T0 )) s"
