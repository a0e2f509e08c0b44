#!/usr/bin/env bash
# Check the planner's rbg connector against a real Kubernetes cluster with RBG installed.
#
# The tests (tests/planner/test_rbg_standin.py) run the connector against a loopback stand-in of the API
# server; this script runs the same code against the real thing, with the RBAC of rbac.yml:
#
#   1. creates a scratch namespace, the planner's ServiceAccount / Role / RoleBinding, and two small
#      RoleBasedGroups of pause containers (no GPUs): `check-adapter` (prefill and decoder roles with
#      scaling adapters, coordinated by a CoordinatedPolicy) and `check-patch` (no adapters);
#   2. builds a kubeconfig from a token of the planner's ServiceAccount, so only its RBAC is in play;
#   3. scales both groups with `dynamo-rt planner --connector rbg --apply-once prefill=N,decode=M` (one
#      write through the connector, the planner's own code path) and checks what the API server and the
#      controller made of it: the adapters' spec.replicas, the group's roles[].replicas, and the pods;
#   4. deletes the namespace (unless KEEP=1).
#
# Needs: kubectl pointing at the cluster (current context), RBG >= v0.8 (CRDs + controller), and the
# dynamo-rt package (`pip install -e .` or `make install`). Usage:
#   manifests/planner/check-on-cluster.sh            # RBG API v1alpha2 (default)
#   API=v1alpha1 manifests/planner/check-on-cluster.sh
set -euo pipefail

NS=${NS:-dynamo-planner-check-$RANDOM}
API=${API:-v1alpha2}
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PY:-python3}
WORK=$(mktemp -d)
cleanup() {
  if [[ "${KEEP:-0}" != 1 ]]; then kubectl delete namespace "$NS" --wait=false >/dev/null 2>&1 || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

say() { printf '\n== %s\n' "$*"; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }

say "namespace $NS, RBG API $API"
kubectl get crd rolebasedgroups.workloads.x-k8s.io rolebasedgroupscalingadapters.workloads.x-k8s.io >/dev/null
kubectl create namespace "$NS" >/dev/null
kubectl apply -n "$NS" -f "$HERE/rbac.yml"

# Two groups of pause containers: one scaled through its adapters, one through JSON patches.
group() {  # name, adapter (true|false)
  local role_shape
  if [[ "$API" == v1alpha1 ]]; then
    role_shape='      workload: {apiVersion: apps/v1, kind: StatefulSet}
      template:
        spec:
          containers: [{name: main, image: registry.k8s.io/pause:3.9}]'
  else
    role_shape='      standalonePattern:
        template:
          spec:
            containers: [{name: main, image: registry.k8s.io/pause:3.9}]'
  fi
  cat <<EOF
apiVersion: workloads.x-k8s.io/$API
kind: RoleBasedGroup
metadata:
  name: $1
spec:
  roles:
    - name: prefill
      replicas: 1
      scalingAdapter: {enable: $2}
$role_shape
    - name: decoder
      replicas: 1
      scalingAdapter: {enable: $2}
$role_shape
EOF
}
{
  group check-adapter true
  echo '---'
  cat <<EOF
apiVersion: workloads.x-k8s.io/v1alpha2
kind: CoordinatedPolicy
metadata:
  name: check-adapter
spec:
  policies:
    - name: pd
      roles: [prefill, decoder]
      strategy:
        scaling: {maxSkew: 50%, progression: OrderScheduled}
EOF
  echo '---'
  group check-patch false
} > "$WORK/groups.yaml"
kubectl apply -n "$NS" -f "$WORK/groups.yaml"

say "waiting for the scaling adapters RBG creates"
for r in prefill decoder; do
  for _ in $(seq 60); do
    kubectl get -n "$NS" rolebasedgroupscalingadapter "check-adapter-$r" >/dev/null 2>&1 && break
    sleep 2
  done
  kubectl get -n "$NS" rolebasedgroupscalingadapter "check-adapter-$r" >/dev/null || fail "no adapter check-adapter-$r"
done

say "kubeconfig with the planner's ServiceAccount token (only its RBAC applies)"
SERVER=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')
CA_DATA=$(kubectl config view --minify --raw -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
TOKEN=$(kubectl create token dynamo-planner -n "$NS" --duration=20m)
cat > "$WORK/kubeconfig" <<EOF
apiVersion: v1
kind: Config
current-context: planner
clusters: [{name: c, cluster: {server: "$SERVER", certificate-authority-data: "$CA_DATA"}}]
users: [{name: planner, user: {token: "$TOKEN"}}]
contexts: [{name: planner, context: {cluster: c, user: planner, namespace: "$NS"}}]
EOF
if [[ -z "$CA_DATA" ]]; then
  fail "the current context has no certificate-authority-data (a CA file?): edit \$WORK/kubeconfig by hand"
fi

planner() {  # group, setting
  "$PY" -m dynamo_rt planner --connector rbg --kubeconfig "$WORK/kubeconfig" --k8s-namespace "$NS" \
    --rbg-name "$1" --rbg-api-version "$API" --apply-once "$2" --log-level warning
}

check_replicas() {  # group, prefill, decoder
  local got
  got=$(kubectl get -n "$NS" rolebasedgroup "$1" -o jsonpath='{range .spec.roles[*]}{.name}={.replicas} {end}')
  [[ "$got" == *"prefill=$2 "* && "$got" == *"decoder=$3 "* ]] || fail "$1 roles: $got (want prefill=$2 decoder=$3)"
  echo "$1 roles: $got"
}

wait_pods() {  # group, role, count
  for _ in $(seq 90); do
    n=$(kubectl get pods -n "$NS" -l "rbg.workloads.x-k8s.io/group-name=$1,rbg.workloads.x-k8s.io/role-name=$2" \
      --field-selector=status.phase=Running -o name | wc -l)
    [[ "$n" -eq "$3" ]] && { echo "$1/$2: $n running pods"; return; }
    sleep 2
  done
  fail "$1/$2: $n running pods, want $3"
}

say "adapter path: scale subresources of check-adapter-prefill / -decoder"
echo "planner sees: $(planner check-adapter show)"
echo "planner sets: $(planner check-adapter prefill=3,decode=2)"
for r in prefill:3 decoder:2; do
  got=$(kubectl get -n "$NS" rolebasedgroupscalingadapter "check-adapter-${r%%:*}" -o jsonpath='{.spec.replicas}')
  [[ "$got" == "${r##*:}" ]] || fail "adapter check-adapter-${r%%:*} spec.replicas=$got, want ${r##*:}"
done
for _ in $(seq 30); do check_replicas check-adapter 3 2 2>/dev/null && break; sleep 2; done
check_replicas check-adapter 3 2
wait_pods check-adapter prefill 3
wait_pods check-adapter decoder 2

say "JSON-patch path: spec.roles[i].replicas of check-patch"
echo "planner sets: $(planner check-patch prefill=2,decode=0)"
check_replicas check-patch 2 0
wait_pods check-patch prefill 2
wait_pods check-patch decoder 0

say "RBAC: the planner may not touch what it does not need"
if kubectl --kubeconfig "$WORK/kubeconfig" delete rolebasedgroup check-patch -n "$NS" >/dev/null 2>&1; then
  fail "the planner's ServiceAccount could delete a RoleBasedGroup"
fi
echo "delete refused, as it should be"

say "OK: the rbg connector works on this cluster (RBG API $API)"
