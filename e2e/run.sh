#!/usr/bin/env bash
# The project's two entry points (see README):
#   bash e2e/run.sh up     a kind cluster with 3 control-plane nodes, the operator's images
#                          loaded and manifests/kind applied
#   bash e2e/run.sh test   every test: fmt and clippy, unit, CRD drift, API tier, kind e2e,
#                          the version matrix (clippy, unit and CRD drift in the background)
#   bash e2e/run.sh bench  the benchmarks, side by side with the alternatives, on the cluster
#                          `up` made (plus API tiers of their own): e2e/bench/RESULTS.md
#   bash e2e/run.sh down   delete the cluster
# Caches live outside the repo: $KCM_CACHE (default /var/cache/kcm-operator).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
cd "$REPO"
export KCM_CACHE=${KCM_CACHE:-/var/cache/kcm-operator}
export KCM_STATE=${KCM_STATE:-/var/tmp/kcm-e2e}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$KCM_CACHE/cargo-target}
export CARGO_TERM_COLOR=never
mkdir -p "$KCM_CACHE" "$KCM_STATE"
TESTBED="$HERE/testbed/testbed.sh"
# The pinned versions (versions.env), each overridable from the environment.
source "$HERE/testbed/versions.sh"
STATIC_TARGET=x86_64-unknown-linux-gnu
# Read by the background jobs (bg_start), which run in a bash of their own.
export HERE STATIC_TARGET

log() { printf '[run %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
step() { # step NAME cmd... : run, print wall time
  local name=$1; shift; local t0=$SECONDS
  log "== $name"
  if "$@"; then log "== $name: ok in $((SECONDS - t0))s"; else local rc=$?; log "== $name: FAILED (exit $rc) after $((SECONDS - t0))s"; return $rc; fi
}

ensure_toolchain() {
  command -v cargo >/dev/null || { log "cargo not found: install Rust (rustup) first"; return 1; }
  # aws-lc-sys needs a C compiler and cmake; curl/openssl are used by the API-tier tests.
  local missing=()
  for c in cc cmake curl openssl; do command -v "$c" >/dev/null || missing+=("$c"); done
  if ((${#missing[@]})); then
    log "installing build tools for: ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential cmake curl openssl >/dev/null
  fi
}

unit_tests() {
  cargo test --workspace --lib --bins
}

# Style: rustfmt.toml's format (first: it takes a second).
fmt_check() {
  if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
    rustup component add rustfmt clippy || return 1
  fi
  cargo fmt --all -- --check || { log "cargo fmt --all would change the files above"; return 1; }
}

# Lints: no clippy warning in any target.
clippy_check() { cargo clippy --workspace --all-targets -- -D warnings; }

# The checks that need no cluster run in the background in `test`, while the binaries are
# built, the cluster comes up and the kind tests run (those mostly wait), in a target dir of
# their own (the kind tests' cargo would otherwise wait for its lock).
offline_checks() {
  export CARGO_TARGET_DIR="$KCM_CACHE/cargo-target-offline"
  step clippy clippy_check && step unit-tests unit_tests && step crd-drift crd_drift
}

# Background jobs of `test`: each in a session of its own (setsid), so that a failed run
# stops all of it (rustc and go build included), at a CPU priority below the steps in
# front of it; its output in $KCM_STATE/<name>.log, printed when it is awaited.
declare -A BG_PIDS=()
bg_start() { # bg_start NAME NICENESS FUNCTION [FUNCTIONS IT CALLS...]
  local name=$1 niceness=$2 fn=$3
  export -f "${@:3}"
  setsid nice -n "$niceness" bash -c "$fn" >"$KCM_STATE/$name.log" 2>&1 </dev/null &
  BG_PIDS[$name]=$!
  log "$name in the background (log: $KCM_STATE/$name.log)"
}
bg_running() { [ -n "${BG_PIDS[$1]:-}" ]; }
bg_wait() { # bg_wait NAME [LINES]: its exit status; its log, only the last LINES when it passed
  local name=$1 lines=${2:-} rc=0
  wait "${BG_PIDS[$name]}" || rc=$?
  unset "BG_PIDS[$name]"
  if [ -n "$lines" ] && [ $rc -eq 0 ]; then tail -n "$lines" "$KCM_STATE/$name.log" >&2; else cat "$KCM_STATE/$name.log" >&2; fi
  return $rc
}
bg_stop_all() { local p; for p in "${BG_PIDS[@]}"; do kill -- "-$p" 2>/dev/null; done; true; }

crd_drift() {
  local tmp; tmp=$(mktemp)
  cargo run -q -p kcm-operator --bin crdgen >"$tmp" || return 1
  if ! diff -u manifests/base/crd.yaml "$tmp"; then
    log "manifests/base/crd.yaml differs from the Rust types: run 'cargo run -p kcm-operator --bin crdgen > manifests/base/crd.yaml'"
    rm -f "$tmp"; return 1
  fi
  rm -f "$tmp"
}

# The kind cluster's Kubernetes (all seven components), etcd and kind.
k8s_bins() { bash "$HERE/testbed/build-k8s.sh"; }

# The version matrix (install.rs): kube-apiserver and kube-controller-manager of each.
# `nice` 19: built in the background while the cluster, the images and the kind tests run
# (those mostly wait), taking only the CPU they leave; cached after the first run.
k8s_matrix_bins() {
  local v
  for v in $(grep -v '^#' "$HERE/testbed/kcm-versions"); do
    K8S_VERSION=$v K8S_COMPONENTS="kube-apiserver kube-controller-manager" nice -n 19 bash "$HERE/testbed/build-k8s.sh" || return 1
  done
}

api_tier() {
  cargo test -p e2e --test api_tier --test manifests --test admission -- --test-threads 2
}

# The helper's install against each kcm of the matrix, each with its own kube-apiserver.
version_matrix() {
  cargo test -p e2e --test install -- --test-threads 2
}

# Static binaries (glibc, crt-static) in one FROM-scratch image, operator/Dockerfile (the
# same file a release uses): /kcm-operator and /node-helper. The helper places the
# operator's static pod with its own image. The context holds only the two binaries.
IMAGE=kcm-operator/kcm-operator:dev
static_build() {
  RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$KCM_CACHE/cargo-target-static" \
    cargo build --release --target "$STATIC_TARGET" -p kcm-operator -p node-helper
}
build_images() {
  # `test` started it in the background, while the cluster came up.
  if bg_running static-build; then
    bg_wait static-build 5 || return 1
  else
    static_build || return 1
  fi
  local out="$KCM_CACHE/cargo-target-static/$STATIC_TARGET/release" ctx
  ctx=$(mktemp -d)
  cp "$out/kcm-operator" "$out/node-helper" "$ctx/" || return 1
  DOCKER_BUILDKIT=0 docker build -q -f "$REPO/operator/Dockerfile" -t "$IMAGE" "$ctx" >/dev/null || return 1
  rm -rf "$ctx"
  log "built image $IMAGE"
}

load_images() {
  bash "$TESTBED" load-image "$IMAGE"
}

cluster_up() { bash "$TESTBED" up; }
cluster_down() { bash "$TESTBED" down; }

kind_e2e() {
  # One file at a time, in this order: each leaves the cluster as the next expects it.
  local t
  # (`step` runs this in an `if`, where `set -e` does not apply: every failure returns.)
  for t in testbed kind_ha kind_operator kind_apiserver kind_rescue kind_crash kind_idle kind_rotation kind_handback kind_bootstrap kind_day0; do
    cargo test -p e2e --test "$t" -- --test-threads 1 --nocapture || return 1
  done
}

apply_manifests() {
  local k=("$KCM_CACHE/k8s-$K8S_VERSION/bin/kubectl" --kubeconfig "$KCM_STATE/kubeconfig")
  # The CRD first: a CR in the same apply as its new CRD is refused.
  "${k[@]}" apply -f manifests/base/crd.yaml || return 1
  "${k[@]}" wait --for=condition=Established --timeout=60s crd/kubecontrollermanagers.kcm.kcm-operator.io crd/kcmnodes.kcm.kcm-operator.io || return 1
  "${k[@]}" apply -k manifests/kind/
}

cmd_up() {
  step toolchain ensure_toolchain
  step cluster cluster_up
  step images build_images
  step load-images load_images
  step apply-manifests apply_manifests
  log "cluster ready: export KUBECONFIG=$KCM_STATE/kubeconfig"
}

cmd_test() {
  local t0=$SECONDS
  step toolchain ensure_toolchain
  step fmt fmt_check
  trap 'bg_stop_all; step cluster-down cluster_down || true' EXIT
  # nice 19: only the CPU the steps in front leave.
  bg_start offline-checks 19 offline_checks log step clippy_check unit_tests crd_drift
  step k8s-binaries k8s_bins
  bg_start k8s-matrix 19 k8s_matrix_bins
  step api-tier api_tier
  # While the cluster comes up (debootstrap, kubeadm: they mostly wait); on a fresh machine
  # this release build is the longest step. nice 10: the cluster's processes come first.
  bg_start static-build 10 static_build
  step cluster-up cluster_up
  step images build_images
  step load-images load_images
  step kind-e2e kind_e2e
  step offline-checks bg_wait offline-checks
  step matrix-binaries bg_wait k8s-matrix
  step version-matrix version_matrix
  log "all tests passed in $((SECONDS - t0))s"
}

cmd_bench() {
  step toolchain ensure_toolchain
  step k8s-binaries k8s_bins
  step matrix-binaries k8s_matrix_bins
  # Release: the figures are the product's, not a debug build's. Not part of `test`.
  step bench-build cargo build -q --release -p kcm-operator -p e2e --bins
  # The API-tier scenarios run this operator binary against their own apiserver.
  KCM_OPERATOR_BIN="$CARGO_TARGET_DIR/release/kcm-operator" step bench "$CARGO_TARGET_DIR/release/bench" "$@"
}

case "${1:-}" in
  up) cmd_up ;;
  test) cmd_test ;;
  images) step images build_images && step load-images load_images ;;  # rebuild + load into the running cluster
  bench) shift; cmd_bench "$@" ;;
  down) cluster_down ;;
  *) echo "usage: $0 up|test|bench [--only key,key]|images|down" >&2; exit 2 ;;
esac
