#!/usr/bin/env bash
# kcm-operator e2e test bed: a real 3-control-plane kind cluster, built fully offline.
#
#   testbed.sh deps         apt packages, dockerd, debootstrap base image, runc cap wrapper if needed
#   testbed.sh bins         Kubernetes/etcd/kind binaries (build-k8s.sh) + crictl + pause
#   testbed.sh images       component images + kind load-balancer image (docker)
#   testbed.sh node-image   the kind node image (needs images)
#   testbed.sh build        all of the above (default for `up` too)
#   testbed.sh up           build (cached) + create cluster "kcm" + wait Ready + write kubeconfig
#   testbed.sh down         delete the cluster, verify nothing is left
#   testbed.sh load-image IMG[:TAG]   kind load docker-image into all nodes
#   testbed.sh hello        build the static Rust hello image (FROM scratch) and load it
#   testbed.sh env          print paths (kubeconfig, binaries) as shell assignments
#   testbed.sh status       cluster / cache overview
#
# Everything big is cached outside the repo in $KCM_CACHE (default /var/cache/kcm-operator),
# keyed by versions; `.complete` markers guard against half-built entries.
# State (kubeconfig, logs, timings) lives in $KCM_STATE (default /var/tmp/kcm-e2e).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)

# The pinned versions (versions.env), each overridable from the environment.
source "$HERE/versions.sh"
export CRICTL_VERSION=${CRICTL_VERSION:-v1.34.0}   # v1.33.x is not on this machine's Go proxy (403)
export KCM_CACHE=${KCM_CACHE:-/var/cache/kcm-operator}
CACHE=$KCM_CACHE
STATE=${KCM_STATE:-/var/tmp/kcm-e2e}
CLUSTER=${KCM_CLUSTER:-kcm}
KIND_CONFIG=${KCM_KIND_CONFIG:-$REPO/kind-config.yaml}
SUITE=bookworm
# Bump a recipe revision when the corresponding build steps change (invalidates caches).
ROOTFS_REV=1
IMAGES_REV=1
NODE_REV=2

K8S_BIN=$CACHE/k8s-$K8S_VERSION/bin
ETCD_BIN=$CACHE/etcd-$ETCD_VERSION/bin
KIND_BIN=$CACHE/kind-$KIND_VERSION/bin
TOOLS_BIN=$CACHE/tools-$CRICTL_VERSION/bin
KIND=$KIND_BIN/kind

# packages of the debootstrapped rootfs'
BASE_PKGS=iptables,conntrack,procps,haproxy,ca-certificates
NODE_PKGS=systemd,containerd,runc,containernetworking-plugins,iptables,nftables,conntrack,iproute2,ethtool,util-linux,mount,kmod,libseccomp2,pigz,bash,ca-certificates,curl,jq,procps
HOST_PKGS=(docker.io containerd runc debootstrap iproute2 iptables jq ca-certificates curl gcc libc6-dev tar)

BASE_IMAGE=kcm-testbed/debian:$SUITE
NODE_IMAGE=${KCM_NODE_IMAGE:-kcm-testbed/node:$K8S_VERSION}
STOCK_NODE_IMAGE=${KCM_STOCK_NODE_IMAGE:-kindest/node:v1.35.0}
HELLO_IMAGE=kcm-testbed/hello:v1

export DOCKER_BUILDKIT=0   # the legacy builder is enough (COPY only) and needs no buildx plugin
export PATH=$KIND_BIN:$K8S_BIN:$ETCD_BIN:$PATH

# ---------------------------------------------------------------- helpers
log() { printf '[testbed %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf '[testbed] ERROR: %s\n' "$*" >&2; exit 1; }

phase() { # phase NAME cmd... : run and report wall time (also appended to $STATE/timings.log)
  local name=$1; shift; local t0=$SECONDS
  log "=== phase $name: start"
  "$@"
  local dt=$((SECONDS - t0))
  log "=== phase $name: done in ${dt}s"
  mkdir -p "$STATE"; echo "$(date -u +%FT%TZ) $name ${dt}s" >> "$STATE/timings.log"
}

wait_for() { # wait_for "what" TIMEOUT_SECONDS cmd... : poll every 2s until cmd succeeds
  local what=$1 timeout=$2; shift 2
  local deadline=$((SECONDS + timeout))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then log "timed out after ${timeout}s waiting for: $what"; return 1; fi
    sleep 2
  done
  log "ok: $what"
}

short_hash() { printf '%s' "$*" | sha256sum | cut -c1-12; }

debian_mirror() { # the Debian mirror this machine's apt uses
  local m
  m=$(grep -hoE '^(deb |URIs:)[[:space:]]*(\[[^]]*\][[:space:]]*)?https?://[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
      | grep -oE 'https?://[^ ]+' | grep -E '/debian/?$' | grep -v security | head -1 || true)
  echo "${m:-http://deb.debian.org/debian}"
}

ROOTFS_KEY=$(short_hash "$ROOTFS_REV $SUITE $BASE_PKGS $NODE_PKGS")
ROOTFS_DIR=$CACHE/rootfs-$SUITE-$ROOTFS_KEY

clean_stale_workdirs() { # from interrupted builds (never while something is mounted inside)
  local d
  for d in /var/tmp/kcm-rootfs.* /var/tmp/kcm-node.* /var/tmp/kcm-images.* /var/tmp/kcm-lb.* /var/tmp/kcm-nodeimg.* /var/tmp/kcm-crictl.*; do
    [ -d "$d" ] || continue
    if grep -q " $d/" /proc/mounts; then log "stale $d has mounts: left alone"; else rm -rf "$d"; fi
  done
}

build_lock() { # one build per cache at a time (run.sh and a developer may both call `up`)
  mkdir -p "$CACHE"
  exec 9>"$CACHE/.build.lock"
  if ! flock -n 9; then
    log "another testbed build holds $CACHE/.build.lock: waiting (deadline 60 min)"
    flock -w 3600 9 || die "the other testbed build did not finish within 60 min"
  fi
}

docker_ok() { timeout 20 docker info >/dev/null 2>&1; }
image_label() { docker image inspect -f "{{ index .Config.Labels \"$2\" }}" "$1" 2>/dev/null || true; }

# ---------------------------------------------------------------- deps
apt_install_missing() {
  local missing=() p
  for p in "${HOST_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && { log "apt: all host packages present"; return; }
  log "apt: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! timeout 1200 apt-get install -y --no-install-recommends "${missing[@]}" >"$STATE/apt.log" 2>&1; then
    log "apt: install failed, running apt-get update once and retrying"
    timeout 600 apt-get update >>"$STATE/apt.log" 2>&1 || die "apt-get update failed (see $STATE/apt.log)"
    timeout 1200 apt-get install -y --no-install-recommends "${missing[@]}" >>"$STATE/apt.log" 2>&1 \
      || die "apt-get install ${missing[*]} failed (see $STATE/apt.log)"
  fi
}

start_docker() {
  docker_ok && { log "docker: daemon is up"; return; }
  command -v dockerd >/dev/null || die "dockerd not installed (apt-get install docker.io)"
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    log "docker: starting via systemctl"; systemctl start docker || true
  elif pgrep -x dockerd >/dev/null; then
    log "docker: dockerd process exists but does not answer yet"
  else
    log "docker: starting dockerd in the background (log: $STATE/dockerd.log)"
    # fd 9 is the build lock: dockerd must not inherit it, or it would hold the lock forever.
    nohup dockerd >"$STATE/dockerd.log" 2>&1 </dev/null 9>&- &
    echo $! > "$STATE/dockerd.pid"
  fi
  if ! wait_for "docker daemon to answer 'docker info'" 90 docker_ok; then
    tail -20 "$STATE/dockerd.log" 2>/dev/null >&2 || true
    die "docker daemon did not start; see $STATE/dockerd.log (stale /var/run/docker.pid? another dockerd?)"
  fi
}

build_rootfs() { # debootstrap the base and the node rootfs once (cached as tarballs)
  if [ -f "$ROOTFS_DIR/.complete" ]; then log "rootfs: cached in $ROOTFS_DIR"; return; fi
  rm -rf "$ROOTFS_DIR"; mkdir -p "$ROOTFS_DIR" "$CACHE/debs"
  clean_stale_workdirs
  local mirror; mirror=$(debian_mirror)
  local w; w=$(mktemp -d /var/tmp/kcm-rootfs.XXXX)
  local v
  for v in base node; do
    local pk=$BASE_PKGS; [ $v = node ] && pk=$NODE_PKGS
    log "rootfs: debootstrap $SUITE ($v: $pk) from $mirror"
    timeout 1800 debootstrap --variant=minbase --cache-dir="$CACHE/debs" --include="$pk" \
      "$SUITE" "$w/$v" "$mirror" >"$STATE/debootstrap-$v.log" 2>&1 \
      || { tail -20 "$STATE/debootstrap-$v.log" >&2; rm -rf "$w"; die "debootstrap $v failed (see $STATE/debootstrap-$v.log)"; }
    chroot "$w/$v" apt-get clean
    rm -rf "$w/$v"/var/lib/apt/lists/* "$w/$v"/usr/share/doc/* "$w/$v"/usr/share/man/* \
      "$w/$v"/usr/share/locale/* "$w/$v"/var/cache/debconf/*-old "$w/$v"/var/log/*.log
    : > "$w/$v/etc/resolv.conf"; rm -f "$w/$v/etc/hostname"
    tar -C "$w/$v" --numeric-owner -cf "$ROOTFS_DIR/$v.tar" .
  done
  rm -rf "$w"
  touch "$ROOTFS_DIR/.complete"
  log "rootfs: $(du -sh "$ROOTFS_DIR" | cut -f1) in $ROOTFS_DIR"
}

import_base_image() {
  if [ "$(image_label "$BASE_IMAGE" kcm.testbed.key)" = "$ROOTFS_KEY" ]; then log "image $BASE_IMAGE: present"; return; fi
  log "image $BASE_IMAGE: docker import"
  docker import --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["/bin/bash"]' --change "LABEL kcm.testbed.key=$ROOTFS_KEY" \
    "$ROOTFS_DIR/base.tar" "$BASE_IMAGE" >/dev/null
}

RUNC_WRAPPER=/usr/local/sbin/runc-capfilter
install_runc_wrapper() {
  log "runc: installing capability-filtering wrapper $RUNC_WRAPPER"
  cat > "$RUNC_WRAPPER" <<'PY'
#!/usr/bin/python3
# Installed by kcm-operator e2e/testbed/testbed.sh: this VM's capability bounding set lacks
# some capabilities (e.g. CAP_SYS_RESOURCE) that `docker run --privileged` asks for, so runc
# fails with "unable to apply caps". Drop every capability not in our own CapBnd from the
# OCI config (create/run: --bundle) or process spec (exec: --process), then exec runc.
import json, os, sys
CAPS = ["CAP_CHOWN","CAP_DAC_OVERRIDE","CAP_DAC_READ_SEARCH","CAP_FOWNER","CAP_FSETID","CAP_KILL",
  "CAP_SETGID","CAP_SETUID","CAP_SETPCAP","CAP_LINUX_IMMUTABLE","CAP_NET_BIND_SERVICE",
  "CAP_NET_BROADCAST","CAP_NET_ADMIN","CAP_NET_RAW","CAP_IPC_LOCK","CAP_IPC_OWNER","CAP_SYS_MODULE",
  "CAP_SYS_RAWIO","CAP_SYS_CHROOT","CAP_SYS_PTRACE","CAP_SYS_PACCT","CAP_SYS_ADMIN","CAP_SYS_BOOT",
  "CAP_SYS_NICE","CAP_SYS_RESOURCE","CAP_SYS_TIME","CAP_SYS_TTY_CONFIG","CAP_MKNOD","CAP_LEASE",
  "CAP_AUDIT_WRITE","CAP_AUDIT_CONTROL","CAP_SETFCAP","CAP_MAC_OVERRIDE","CAP_MAC_ADMIN","CAP_SYSLOG",
  "CAP_WAKE_ALARM","CAP_BLOCK_SUSPEND","CAP_AUDIT_READ","CAP_PERFMON","CAP_BPF","CAP_CHECKPOINT_RESTORE"]
REAL = "/usr/sbin/runc"
def allowed():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapBnd:"):
                mask = int(line.split()[1], 16)
    return {c for i, c in enumerate(CAPS) if mask >> i & 1}
def filt(proc, ok):
    caps = proc.get("capabilities") or {}
    for k, v in list(caps.items()):
        if isinstance(v, list):
            caps[k] = [c for c in v if c in ok]
def rewrite(path, is_process):
    try:
        with open(path) as f:
            spec = json.load(f)
    except OSError:
        return
    ok = allowed()
    filt(spec if is_process else spec.get("process") or {}, ok)
    with open(path, "w") as f:
        json.dump(spec, f)
def main():
    a = sys.argv[1:]
    cmd = next((x for x in a if x in ("create", "run", "exec")), None)
    if cmd in ("create", "run"):
        bundle = "."
        for i, x in enumerate(a):
            if x in ("--bundle", "-b") and i + 1 < len(a): bundle = a[i + 1]
            elif x.startswith("--bundle="): bundle = x.split("=", 1)[1]
        rewrite(os.path.join(bundle, "config.json"), False)
    elif cmd == "exec":
        for i, x in enumerate(a):
            if x in ("--process", "-p") and i + 1 < len(a): rewrite(a[i + 1], True)
            elif x.startswith("--process="): rewrite(x.split("=", 1)[1], True)
    os.execv(REAL, [REAL] + a)
main()
PY
  chmod 755 "$RUNC_WRAPPER"
  local dj=/etc/docker/daemon.json
  mkdir -p /etc/docker
  if [ -s "$dj" ] && ! grep -q runc-capfilter "$dj"; then cp "$dj" "$dj.kcm-backup"; fi
  python3 - "$dj" "$RUNC_WRAPPER" <<'PY'
import json, sys, os
p, w = sys.argv[1], sys.argv[2]
d = json.load(open(p)) if os.path.exists(p) and os.path.getsize(p) else {}
d.setdefault("runtimes", {})["runc-capfilter"] = {"path": w}
d["default-runtime"] = "runc-capfilter"
json.dump(d, open(p, "w"), indent=2)
PY
  log "docker: restarting dockerd to pick up $dj"
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl restart docker
  else
    local pid; pid=$(cat /var/run/docker.pid 2>/dev/null || true)
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + 60))
    while [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; do
      [ $SECONDS -ge $deadline ] && die "dockerd (pid $pid) did not exit within 60s"
      sleep 1
    done
    nohup dockerd >>"$STATE/dockerd.log" 2>&1 </dev/null 9>&- &
    echo $! > "$STATE/dockerd.pid"
  fi
  wait_for "docker daemon to answer after restart" 90 docker_ok || die "dockerd did not come back (see $STATE/dockerd.log)"
}

privileged_probe() { timeout 60 docker run --rm --privileged --net=none "$BASE_IMAGE" true >"$STATE/privileged-probe.log" 2>&1; }

ensure_privileged() {
  if privileged_probe; then log "docker: 'docker run --privileged' works"; return; fi
  log "docker: 'docker run --privileged' fails: $(grep -m1 -i error "$STATE/privileged-probe.log" || tail -1 "$STATE/privileged-probe.log")"
  install_runc_wrapper
  privileged_probe || { cat "$STATE/privileged-probe.log" >&2; die "'docker run --privileged' still fails with the runc wrapper"; }
  log "docker: 'docker run --privileged' works with the runc wrapper"
}

cmd_deps() {
  mkdir -p "$STATE" "$CACHE"
  [ "$(id -u)" = 0 ] || die "run as root (needs apt, dockerd, debootstrap, chroot)"
  apt_install_missing
  start_docker
  build_rootfs
  import_base_image
  ensure_privileged
}

# ---------------------------------------------------------------- bins
build_tools() { # crictl (kind's `load docker-image` uses it in the nodes) and a static pause binary
  if [ -f "$TOOLS_BIN/.complete" ]; then log "tools: cached in $TOOLS_BIN"; return; fi
  rm -rf "$TOOLS_BIN"; mkdir -p "$TOOLS_BIN"
  log "tools: build crictl $CRICTL_VERSION (sigs.k8s.io/cri-tools, via a wrapper module)"
  local w; w=$(mktemp -d /var/tmp/kcm-crictl.XXXX)
  ( cd "$w" && export CGO_ENABLED=0 GOTOOLCHAIN=local GOFLAGS=-mod=mod \
    && go mod init kcm-testbed/crictl >/dev/null 2>&1 \
    && go mod edit -require "sigs.k8s.io/cri-tools@$CRICTL_VERSION" \
    && printf '//go:build tools\npackage tools\nimport _ "sigs.k8s.io/cri-tools/cmd/crictl"\n' > tools.go \
    && timeout 1200 go mod tidy >/dev/null 2>"$STATE/crictl-build.log" \
    && timeout 1800 go build -trimpath -ldflags "-s -w -X sigs.k8s.io/cri-tools/pkg/version.Version=$CRICTL_VERSION" \
         -o "$TOOLS_BIN/crictl" sigs.k8s.io/cri-tools/cmd/crictl 2>>"$STATE/crictl-build.log" ) \
    || { tail -5 "$STATE/crictl-build.log" >&2; rm -rf "$w"; die "crictl build failed (see $STATE/crictl-build.log)"; }
  rm -rf "$w"
  log "tools: pause (static C)"
  gcc -Os -static -o "$TOOLS_BIN/pause" "$HERE/pause.c"
  strip "$TOOLS_BIN/pause"
  touch "$TOOLS_BIN/.complete"
}

bins_cached() { [ -f "$K8S_BIN/.complete" ] && [ -f "$ETCD_BIN/.complete" ] && [ -f "$KIND_BIN/.complete" ]; }

cmd_bins() {
  mkdir -p "$STATE" "$CACHE"
  # Another build-k8s.sh (a second `up`, or e2e/run.sh's background build of the version
  # matrix, which builds other versions) is waited for only when this cluster's binaries
  # are missing. The pattern's [b] keeps pgrep from matching the `sh -c` that runs it
  # (whose command line holds the pattern itself): without it the wait never ends.
  if ! bins_cached && pgrep -f 'testbed/[b]uild-k8s.sh' >/dev/null; then
    wait_for "the running build-k8s.sh (another process) to finish" 5400 sh -c "! pgrep -f 'testbed/[b]uild-k8s.sh'" \
      || die "build-k8s.sh still running after 90 min"
  fi
  if bins_cached; then
    log "bins: k8s $K8S_VERSION, etcd $ETCD_VERSION, kind $KIND_VERSION cached"
  else
    timeout 4800 bash "$HERE/build-k8s.sh" 2>&1 | tee "$STATE/build-k8s.log" | { grep -v '^go: downloading' >&2 || true; } \
      || die "build-k8s.sh failed (see $STATE/build-k8s.log)"
  fi
  build_tools
}

# ---------------------------------------------------------------- images
kubeadm_image() { # kubeadm_image NAME -> the exact reference kubeadm expects (registry.k8s.io/NAME:TAG)
  kubeadm config images list --kubernetes-version "$K8S_VERSION" 2>/dev/null | grep -E "/$1:" | head -1
}

IMAGES_KEY() { short_hash "$IMAGES_REV $K8S_VERSION $ETCD_VERSION $ROOTFS_KEY $(sha256sum "$HERE/pause.c" | cut -c1-16)"; }
LB_IMAGE() { sed -n 's/^const Image = "\(.*\)"/\1/p' "$(kind_src)/pkg/cluster/internal/loadbalancer/const.go"; }
LB_CONFIG_PATH() { sed -n 's/^const ConfigPath = "\(.*\)"/\1/p' "$(kind_src)/pkg/cluster/internal/loadbalancer/const.go"; }
kind_src() { # the kind module directory (base files, loadbalancer constants) -- fetched, never committed
  local d
  d=$(cd /tmp && GOFLAGS=-mod=mod timeout 600 go mod download -json "sigs.k8s.io/kind@$KIND_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')
  [ -d "$d" ] || die "go mod download sigs.k8s.io/kind@$KIND_VERSION gave no module dir"
  echo "$d"
}

component_refs() { # all images the node image carries: kubeadm's list (minus coredns) + our base
  local n
  for n in kube-apiserver kube-controller-manager kube-scheduler kube-proxy etcd pause; do kubeadm_image $n; done
  echo "docker.io/$BASE_IMAGE"
}

prune_old_images() { # superseded (now untagged) test-bed images
  docker image prune -f --filter label=kcm.testbed.key >/dev/null 2>&1 || true
}

docker_build() { # docker_build TAG DIR  (legacy builder, quiet)
  docker build -q -t "$1" "$2" >"$STATE/docker-build.log" 2>&1 || { cat "$STATE/docker-build.log" >&2; die "docker build $1 failed"; }
}

cmd_images() {
  mkdir -p "$STATE"
  command -v kubeadm >/dev/null || die "kubeadm not built yet: run '$0 bins'"
  local key; key=$(IMAGES_KEY)
  local ref all_present=1
  for ref in $(component_refs); do
    [ "$(image_label "$ref" kcm.testbed.key)" = "$key" ] || [ "$ref" = "docker.io/$BASE_IMAGE" ] || all_present=0
  done
  if [ $all_present = 1 ]; then
    log "images: component images present (key $key)"
  else
    local w; w=$(mktemp -d /var/tmp/kcm-images.XXXX)
    local c
    for c in kube-apiserver kube-controller-manager kube-scheduler; do
      mkdir -p "$w/$c"; cp "$K8S_BIN/$c" "$w/$c/"
      printf 'FROM %s\nCOPY %s /usr/local/bin/%s\nLABEL kcm.testbed.key=%s\nENTRYPOINT ["/usr/local/bin/%s"]\n' \
        "$BASE_IMAGE" "$c" "$c" "$key" "$c" > "$w/$c/Dockerfile"
      docker_build "$(kubeadm_image $c)" "$w/$c"
    done
    # kube-proxy shells out to iptables; pick legacy vs nft like upstream's iptables-wrapper does
    mkdir -p "$w/kube-proxy"; cp "$K8S_BIN/kube-proxy" "$w/kube-proxy/kube-proxy.real"
    cat > "$w/kube-proxy/kube-proxy" <<'SH'
#!/bin/sh
# select the iptables backend that the node already uses (fewer rules = not in use)
legacy=$( (iptables-legacy-save || true; ip6tables-legacy-save || true) 2>/dev/null | grep -c '^-' )
nft=$( (iptables-nft-save || true; ip6tables-nft-save || true) 2>/dev/null | grep -c '^-' )
mode=nft; [ "$legacy" -gt "$nft" ] && mode=legacy
for t in iptables ip6tables; do update-alternatives --set $t /usr/sbin/$t-$mode >/dev/null 2>&1 || true; done
exec /usr/local/bin/kube-proxy.real "$@"
SH
    chmod 755 "$w/kube-proxy/kube-proxy"
    printf 'FROM %s\nCOPY kube-proxy kube-proxy.real /usr/local/bin/\nLABEL kcm.testbed.key=%s\nENTRYPOINT ["/usr/local/bin/kube-proxy"]\n' \
      "$BASE_IMAGE" "$key" > "$w/kube-proxy/Dockerfile"
    docker_build "$(kubeadm_image kube-proxy)" "$w/kube-proxy"
    mkdir -p "$w/etcd"; cp "$ETCD_BIN/etcd" "$w/etcd/"
    printf 'FROM %s\nCOPY etcd /usr/local/bin/\nLABEL kcm.testbed.key=%s\nENTRYPOINT ["/usr/local/bin/etcd"]\n' \
      "$BASE_IMAGE" "$key" > "$w/etcd/Dockerfile"
    docker_build "$(kubeadm_image etcd)" "$w/etcd"
    mkdir -p "$w/pause"; cp "$TOOLS_BIN/pause" "$w/pause/"
    printf 'FROM scratch\nCOPY pause /pause\nLABEL kcm.testbed.key=%s\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' "$key" > "$w/pause/Dockerfile"
    docker_build "$(kubeadm_image pause)" "$w/pause"
    rm -rf "$w"
    log "images: built $(component_refs | tr '\n' ' ')"
  fi
  build_lb_image
}

build_lb_image() { # kind's external load balancer for multi-control-plane clusters
  local src lb cfgpath; src=$(kind_src); lb=$(LB_IMAGE); cfgpath=$(LB_CONFIG_PATH)
  [ -n "$lb" ] && [ -n "$cfgpath" ] || die "could not read the load balancer image/config path from $src"
  local key; key=$(short_hash "$ROOTFS_KEY $lb $cfgpath $(sha256sum "$HERE/lb-entrypoint.sh" | cut -c1-16)")
  if [ "$(image_label "$lb" kcm.testbed.key)" = "$key" ]; then log "images: $lb present"; return; fi
  case "$lb" in *haproxy*) ;; *) die "kind $KIND_VERSION's load balancer ($lb) is not haproxy: adapt build_lb_image" ;; esac
  local w; w=$(mktemp -d /var/tmp/kcm-lb.XXXX)
  cp "$src/images/haproxy/haproxy.cfg" "$w/haproxy.cfg"; cp "$HERE/lb-entrypoint.sh" "$w/"
  printf 'FROM %s\nRUN mkdir -p %s\nCOPY haproxy.cfg %s\nCOPY lb-entrypoint.sh /usr/local/bin/\nLABEL kcm.testbed.key=%s\nSTOPSIGNAL SIGUSR1\nENTRYPOINT ["/usr/local/bin/lb-entrypoint.sh", "%s"]\n' \
    "$BASE_IMAGE" "$(dirname "$cfgpath")" "$cfgpath" "$key" "$cfgpath" > "$w/Dockerfile"
  docker_build "$lb" "$w"
  rm -rf "$w"
  prune_old_images
  log "images: built $lb (haproxy from Debian $SUITE)"
}

# ---------------------------------------------------------------- node image
NODE_KEY() { short_hash "$NODE_REV $(oom_adj_lowerable) $(IMAGES_KEY) $KIND_VERSION $CRICTL_VERSION $(sha256sum "$HERE/cni-config.sh" | cut -c1-16)"; }

cmd_node_image() {
  mkdir -p "$STATE"
  local key; key=$(NODE_KEY)
  local ndir=$CACHE/node-$K8S_VERSION-$key
  if [ "$(image_label "$NODE_IMAGE" kcm.testbed.key)" = "$key" ]; then log "node image $NODE_IMAGE: present (key $key)"; return; fi
  if [ ! -f "$ndir/.complete" ]; then
    rm -rf "$ndir"; mkdir -p "$ndir"
    build_node_rootfs "$ndir/rootfs.tar"
    touch "$ndir/.complete"
  else
    log "node image: rootfs cached in $ndir"
  fi
  log "node image: docker import $NODE_IMAGE"
  docker import \
    --change 'ENV container=docker' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]' \
    "$ndir/rootfs.tar" "kcm-testbed/node-rootfs:$key" >/dev/null || die "docker import of the node rootfs failed"
  # `docker import --change` has no STOPSIGNAL: add it (and the cache key) with a no-RUN build
  local w; w=$(mktemp -d /var/tmp/kcm-nodeimg.XXXX)
  printf 'FROM kcm-testbed/node-rootfs:%s\nSTOPSIGNAL SIGRTMIN+3\nLABEL kcm.testbed.key=%s\n' "$key" "$key" > "$w/Dockerfile"
  docker_build "$NODE_IMAGE" "$w"; rm -rf "$w"
  docker rmi "kcm-testbed/node-rootfs:$key" >/dev/null 2>&1 || true
  prune_old_images
  # drop older cached node rootfs' of this k8s version (each is ~1 GB)
  local d; for d in "$CACHE"/node-"$K8S_VERSION"-*; do [ "$d" = "$ndir" ] || rm -rf "$d"; done
}

build_node_rootfs() { # build_node_rootfs OUT.tar : kind-style node rootfs, assembled on the host
  local out=$1 src; src=$(kind_src)
  local r; r=$(mktemp -d /var/tmp/kcm-node.XXXX)
  log "node image: unpack debootstrapped rootfs"
  tar -C "$r" -xf "$ROOTFS_DIR/node.tar"
  local f=$src/images/base/files
  # kind's base files (what kind's base Dockerfile COPYs)
  install -m 0755 -D -t "$r/usr/local/bin" "$f"/usr/local/bin/*
  mkdir -p "$r/kind/bin"; cp -r "$f/kind/." "$r/kind/"; chmod -R a+rX "$r/kind"; chmod 0755 "$r"/kind/bin/*
  install -m 0644 -D -t "$r/etc" "$f/etc/crictl.yaml"
  install -m 0644 -D -t "$r/etc/containerd" "$f/etc/containerd/config.toml"
  install -m 0644 -D -t "$r/etc/default" "$f/etc/default/kubelet"
  install -m 0644 -D -t "$r/etc/sysctl.d" "$f"/etc/sysctl.d/*
  install -m 0644 -D -t "$r/etc/systemd/system" "$f"/etc/systemd/system/*.service "$f"/etc/systemd/system/*.slice
  install -m 0644 -D -t "$r/etc/systemd/system/kubelet.service.d" "$f"/etc/systemd/system/kubelet.service.d/*
  # containerd 1.6 from Debian: kind's unit starts /usr/local/bin/containerd
  ln -sf /usr/bin/containerd "$r/usr/local/bin/containerd"
  local pause; pause=$(kubeadm_image pause)
  sed -i "s#sandbox_image = .*#sandbox_image = \"$pause\"#" "$r/etc/containerd/config.toml"
  grep -q 'SystemdCgroup = true' "$r/etc/containerd/config.toml" || die "kind's containerd config lost SystemdCgroup = true"
  # Lowering oom_score_adj needs CAP_SYS_RESOURCE, which some hosts (these VMs) do not grant
  # even to privileged containers: runc init then dies ("can't get final child's PID from
  # pipe: EOF") for every pod sandbox with a negative score. Let containerd clamp instead.
  if [ "$(oom_adj_lowerable)" = no ]; then
    sed -i 's/restrict_oom_score_adj = false/restrict_oom_score_adj = true/' "$r/etc/containerd/config.toml"
    log "node image: host cannot lower oom_score_adj -> containerd restrict_oom_score_adj = true"
  fi
  ctr oci spec \
    | jq '.hooks.createContainer[.hooks.createContainer| length] |= . + {"path": "/kind/bin/mount-product-files.sh"}' \
    | jq 'del(.process.rlimits)' > "$r/etc/containerd/cri-base.json"
  # systemd tweaks from kind's base Dockerfile
  rm -f "$r"/lib/systemd/system/sysinit.target.wants/systemd-tmpfiles-setup.service \
    "$r"/lib/systemd/system/multi-user.target.wants/* "$r"/lib/systemd/system/local-fs.target.wants/* \
    "$r"/lib/systemd/system/sockets.target.wants/*udev* "$r"/lib/systemd/system/sockets.target.wants/*initctl* \
    "$r"/lib/systemd/system/basic.target.wants/*
  rm -rf "$r"/etc/systemd/system/*.wants
  echo "ReadKMsg=no" >> "$r/etc/systemd/journald.conf"
  ln -sf /lib/systemd/systemd "$r/sbin/init"
  # CNI: Debian's plugins + a bridge config written at boot (no kindnetd; disableDefaultCNI)
  mkdir -p "$r/opt/cni/bin" "$r/etc/cni/net.d"
  local p; for p in "$r"/usr/lib/cni/*; do ln -sf "/usr/lib/cni/$(basename "$p")" "$r/opt/cni/bin/"; done
  install -m 0755 "$HERE/cni-config.sh" "$r/kind/bin/kcm-cni-config.sh"
  cat > "$r/etc/systemd/system/kcm-cni-config.service" <<'UNIT'
[Unit]
Description=kcm-testbed: write the node's bridge CNI config
Before=containerd.service kubelet.service
[Service]
Type=oneshot
ExecStart=/kind/bin/kcm-cni-config.sh
RemainAfterExit=yes
[Install]
WantedBy=multi-user.target
UNIT
  chroot "$r" systemctl enable kubelet.service containerd.service undo-mount-hacks.service kcm-cni-config.service >/dev/null 2>&1 \
    || die "systemctl enable in the node rootfs failed"
  chroot "$r" systemctl mask systemd-binfmt.service >/dev/null 2>&1
  mkdir -p "$r/etc/kubernetes/manifests"
  # Kubernetes bits
  install -m 0755 "$K8S_BIN/kubeadm" "$K8S_BIN/kubelet" "$K8S_BIN/kubectl" "$r/usr/bin/"
  install -m 0755 -D "$K8S_BIN/kube-controller-manager" "$r/opt/k8s/bin/kube-controller-manager"
  install -m 0755 "$TOOLS_BIN/crictl" "$r/usr/local/bin/crictl"
  echo "$K8S_VERSION" > "$r/kind/version"
  # component images into the node's containerd content store (namespace k8s.io, pinned)
  import_images_into "$r/var/lib/containerd"
  log "node image: tar rootfs ($(du -sh "$r" | cut -f1))"
  tar -C "$r" --numeric-owner -cf "$out" .
  rm -rf "$r"
}

oom_adj_lowerable() { # can a process here lower its oom_score_adj (CAP_SYS_RESOURCE)?
  # (lowering below the current value; nodes' pods want down to -998)
  if sh -c 'echo $(( $(cat /proc/self/oom_score_adj) - 1 )) > /proc/self/oom_score_adj' 2>/dev/null; then echo yes; else echo no; fi
}

TMP_CTRD=/run/kcm-ctrd-$(short_hash "$CACHE")   # private containerd used while building the node image
stop_tmp_containerd() {
  local pid; pid=$(cat "$TMP_CTRD/pid" 2>/dev/null || true)
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + 30))
  while kill -0 "$pid" 2>/dev/null; do
    [ $SECONDS -ge $deadline ] && { log "temporary containerd $pid did not stop, killing"; kill -9 "$pid" 2>/dev/null || true; break; }
    sleep 0.5
  done
  rm -rf "$TMP_CTRD"
}

import_images_into() { # run a private containerd on the host with root=$1, import + pin the images
  local root=$1
  stop_tmp_containerd; mkdir -p "$TMP_CTRD" "$root"
  cat > "$TMP_CTRD/config.toml" <<EOF
version = 2
root = "$root"
state = "$TMP_CTRD/state"
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "$TMP_CTRD/containerd.sock"
[ttrpc]
  address = "$TMP_CTRD/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
EOF
  containerd --config "$TMP_CTRD/config.toml" >"$STATE/tmp-containerd.log" 2>&1 &
  echo $! > "$TMP_CTRD/pid"
  local CTR=(ctr --address "$TMP_CTRD/containerd.sock" -n k8s.io)
  wait_for "temporary containerd to serve $TMP_CTRD/containerd.sock" 60 "${CTR[@]}" version \
    || { tail "$STATE/tmp-containerd.log" >&2; die "temporary containerd did not start"; }
  local refs; refs=$(component_refs)
  log "node image: docker save | ctr import: $(echo $refs)"
  # shellcheck disable=SC2086
  docker save $refs > "$TMP_CTRD/images.tar"
  "${CTR[@]}" images import --no-unpack --all-platforms "$TMP_CTRD/images.tar" >/dev/null \
    || die "ctr images import failed"
  rm -f "$TMP_CTRD/images.tar"
  local ref
  for ref in $refs; do
    "${CTR[@]}" images label "$ref" io.cri-containerd.pinned=pinned >/dev/null || die "ctr images label $ref failed"
  done
  "${CTR[@]}" images ls -q | sed 's/^/  node image has: /' >&2
  stop_tmp_containerd
}

# ---------------------------------------------------------------- build / stock images
stock_images_available() { # on a machine with a registry, use kind's published node image
  [ "${KCM_TESTBED_NO_PULL:-}" = 1 ] && return 1
  docker image inspect "$STOCK_NODE_IMAGE" >/dev/null 2>&1 && return 0
  log "checking whether stock kind images can be pulled ($STOCK_NODE_IMAGE, 20s timeout)"
  timeout 20 docker manifest inspect "$STOCK_NODE_IMAGE" >/dev/null 2>&1 || { log "no registry: building everything locally"; return 1; }
  log "registry reachable: pulling $STOCK_NODE_IMAGE (deadline 15 min)"
  timeout 900 docker pull -q "$STOCK_NODE_IMAGE" >/dev/null || { log "pull failed: building everything locally"; return 1; }
}

stock_node_image() { # kindest/node + the matching kube-controller-manager binary at /opt/k8s/bin (untested here: no registry)
  local v=${STOCK_NODE_IMAGE##*:} img=kcm-testbed/node-stock:${STOCK_NODE_IMAGE##*:}
  docker image inspect "$img" >/dev/null 2>&1 && { NODE_IMAGE=$img; return; }
  local kcm=registry.k8s.io/kube-controller-manager:$v w cid
  timeout 600 docker pull -q "$kcm" >/dev/null || die "could not pull $kcm"
  w=$(mktemp -d /var/tmp/kcm-stock.XXXX)
  cid=$(docker create "$kcm" /x); docker cp "$cid:/usr/local/bin/kube-controller-manager" "$w/" ; docker rm "$cid" >/dev/null
  printf 'FROM %s\nCOPY kube-controller-manager /opt/k8s/bin/kube-controller-manager\n' "$STOCK_NODE_IMAGE" > "$w/Dockerfile"
  docker_build "$img" "$w"; rm -rf "$w"
  NODE_IMAGE=$img
}

cmd_build() {
  phase deps cmd_deps
  if stock_images_available; then
    log "stock image $STOCK_NODE_IMAGE available: building no images (kind pulls its load balancer itself)"
    phase bins-kind-only ensure_kind_only
    stock_node_image
    echo "$NODE_IMAGE" > "$STATE/node-image"; echo "${STOCK_NODE_IMAGE##*:}" > "$STATE/k8s-version"
    return
  fi
  phase bins cmd_bins
  phase images cmd_images
  phase node-image cmd_node_image
  echo "$NODE_IMAGE" > "$STATE/node-image"; echo "$K8S_VERSION" > "$STATE/k8s-version"
}

ensure_kind_only() {
  [ -x "$KIND" ] && return
  mkdir -p "$KIND_BIN"; GOBIN="$KIND_BIN" GOFLAGS=-mod=mod go install "sigs.k8s.io/kind@$KIND_VERSION"
  touch "$KIND_BIN/.complete"
}

# ---------------------------------------------------------------- cluster
cluster_exists() { "$KIND" get clusters 2>/dev/null | grep -qx "$CLUSTER"; }

all_nodes_ready() {
  local out; out=$(kubectl --kubeconfig "$STATE/kubeconfig" get nodes --no-headers 2>/dev/null) || return 1
  [ "$(echo "$out" | grep -c ' Ready ')" -ge 3 ]
}

cmd_up() {
  mkdir -p "$STATE"
  if [ "${KCM_TESTBED_SKIP_BUILD:-}" = 1 ]; then start_docker; else cmd_build; fi
  local image; image=$(cat "$STATE/node-image" 2>/dev/null || echo "$NODE_IMAGE")
  docker image inspect "$image" >/dev/null 2>&1 || die "node image $image missing: run '$0 build'"
  if cluster_exists && [ "${KCM_REUSE_CLUSTER:-}" = 1 ]; then
    "$KIND" get kubeconfig --name "$CLUSTER" > "$STATE/kubeconfig" 2>/dev/null || true
    if all_nodes_ready; then log "KCM_REUSE_CLUSTER=1: cluster '$CLUSTER' exists with 3 Ready nodes: reusing it"; return; fi
    log "KCM_REUSE_CLUSTER=1 but cluster '$CLUSTER' is not healthy: recreating it"
  fi
  if cluster_exists; then
    log "cluster '$CLUSTER' is left over from an earlier run: deleting it and creating a fresh one"
    "$KIND" delete cluster --name "$CLUSTER" >&2 || die "could not delete leftover cluster $CLUSTER"
  fi
  local cfg=$KIND_CONFIG
  if [ -n "${KCM_API_PORT:-}" ]; then
    if ss -ltnH "sport = :$KCM_API_PORT" | grep -q .; then
      die "KCM_API_PORT=$KCM_API_PORT is already in use on this host ($(ss -ltnpH "sport = :$KCM_API_PORT" | head -1)); pick another or unset it (kind then picks a free port)"
    fi
    cfg=$STATE/kind-config.yaml
    sed "s/^\(\s*\)# apiServerPort:.*/\1apiServerPort: $KCM_API_PORT/" "$KIND_CONFIG" > "$cfg"
  fi
  local t0=$SECONDS
  log "kind create cluster --name $CLUSTER --image $image --config $cfg"
  if ! timeout 900 "$KIND" create cluster --name "$CLUSTER" --image "$image" --config "$cfg" \
       --kubeconfig "$STATE/kubeconfig" --retain --wait 0s >&2; then
    log "kind create cluster failed; exporting logs to $STATE/kind-logs"
    rm -rf "$STATE/kind-logs"; timeout 120 "$KIND" export logs "$STATE/kind-logs" --name "$CLUSTER" >/dev/null 2>&1 || true
    "$KIND" delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
    die "kind create cluster failed (or hit its 15 min deadline) after $((SECONDS - t0))s (node logs: $STATE/kind-logs)"
  fi
  log "kind create: $((SECONDS - t0))s"; echo "$(date -u +%FT%TZ) kind-create $((SECONDS - t0))s" >> "$STATE/timings.log"
  if ! wait_for "all 3 nodes of cluster $CLUSTER to be Ready" 300 all_nodes_ready; then
    kubectl --kubeconfig "$STATE/kubeconfig" get nodes -o wide >&2 || true
    kubectl --kubeconfig "$STATE/kubeconfig" get pods -A -o wide >&2 || true
    die "nodes not Ready; cluster left running for inspection (delete: $0 down)"
  fi
  kubectl --kubeconfig "$STATE/kubeconfig" get nodes -o wide >&2
  case "$image" in kcm-testbed/node-stock:*) cmd_load_image "$BASE_IMAGE" ;; esac
  log "cluster $CLUSTER is up. export KUBECONFIG=$STATE/kubeconfig"
}

need_docker() {
  docker_ok || die "docker daemon is not answering 'docker info': start it with '$0 deps'"
  [ -x "$KIND" ] || die "kind $KIND_VERSION is not built ($KIND missing): run '$0 bins'"
}

cmd_down() {
  need_docker
  if cluster_exists; then
    "$KIND" delete cluster --name "$CLUSTER" >&2
  else
    log "no cluster '$CLUSTER'"
  fi
  local left; left=$(docker ps -aq --filter "label=io.x-k8s.kind.cluster=$CLUSTER")
  [ -z "$left" ] || { docker rm -f -v $left >/dev/null; log "removed leftover containers: $left"; }
  # kind's shared network: remove it when no container uses it any more
  if docker network inspect kind >/dev/null 2>&1; then
    if [ "$(docker network inspect -f '{{len .Containers}}' kind)" = 0 ]; then docker network rm kind >/dev/null && log "removed docker network kind"
    else log "docker network kind still used by other containers: kept"; fi
  fi
  [ -z "$(docker ps -aq --filter "label=io.x-k8s.kind.cluster=$CLUSTER")" ] || die "containers of cluster $CLUSTER still exist"
  rm -f "$STATE/kubeconfig"
  log "cluster $CLUSTER: gone (no containers left)"
}

cmd_load_image() {
  [ $# -ge 1 ] || die "usage: $0 load-image IMAGE[:TAG]..."
  need_docker
  cluster_exists || die "cluster '$CLUSTER' does not exist: run '$0 up' first"
  local img; for img in "$@"; do
    docker image inspect "$img" >/dev/null 2>&1 || die "docker has no image $img (build or tag it first)"
    timeout 300 "$KIND" load docker-image --name "$CLUSTER" "$img" >&2 || die "kind load docker-image $img failed"
  done
}

cmd_hello() { # static Rust binary, FROM scratch, loaded into the cluster
  local t="x86_64-unknown-linux-musl" flags=""
  rustup target list --installed 2>/dev/null | grep -qx "$t" || { t="x86_64-unknown-linux-gnu"; flags="-C target-feature=+crt-static"; }
  ( cd "$HERE/hello" && RUSTFLAGS="$flags" cargo build --release --locked --offline --target "$t" --target-dir "$HERE/hello/target" -q 2>/dev/null \
      || RUSTFLAGS="$flags" cargo build --release --target "$t" --target-dir "$HERE/hello/target" -q ) || die "cargo build of e2e/testbed/hello failed"
  local w; w=$(mktemp -d /var/tmp/kcm-hello.XXXX)
  cp "$HERE/hello/target/$t/release/hello" "$w/hello"
  printf 'FROM scratch\nCOPY hello /hello\nUSER 65534:65534\nENTRYPOINT ["/hello"]\n' > "$w/Dockerfile"
  docker_build "$HELLO_IMAGE" "$w"; rm -rf "$w"
  cmd_load_image "$HELLO_IMAGE"
  echo "$HELLO_IMAGE"
}

cmd_env() {
  cat <<EOF
export KUBECONFIG=$STATE/kubeconfig
export KCM_STATE=$STATE
export KCM_CACHE=$CACHE
export KCM_CLUSTER=$CLUSTER
export KCM_NODE_CONTAINERS="$CLUSTER-control-plane $CLUSTER-control-plane2 $CLUSTER-control-plane3"
export KCM_BASE_IMAGE=$BASE_IMAGE
export KCM_K8S_BIN=$K8S_BIN
export KCM_KUBE_APISERVER=$K8S_BIN/kube-apiserver
export KCM_KUBE_CONTROLLER_MANAGER=$K8S_BIN/kube-controller-manager
export KCM_KUBECTL=$K8S_BIN/kubectl
export KCM_ETCD=$ETCD_BIN/etcd
export KCM_KIND=$KIND
EOF
}

cmd_status() {
  log "cache $CACHE: $(du -sh "$CACHE" 2>/dev/null | cut -f1)"; du -sh "$CACHE"/* 2>/dev/null >&2 || true
  docker_ok || { log "docker: not running"; return; }
  cluster_exists && log "cluster $CLUSTER exists" || log "cluster $CLUSTER does not exist"
  docker ps --filter "label=io.x-k8s.kind.cluster=$CLUSTER" --format '{{.Names}}\t{{.Status}}\t{{.Image}}' >&2
  [ -f "$STATE/timings.log" ] && { log "timings:"; tail -20 "$STATE/timings.log" >&2; }
}

main() {
  local cmd=${1:-help}; shift || true
  mkdir -p "$STATE"
  case "$cmd" in
    deps) build_lock; phase deps cmd_deps ;;
    bins) build_lock; phase bins cmd_bins ;;
    images) build_lock; phase images cmd_images ;;
    node-image) build_lock; phase node-image cmd_node_image ;;
    build) build_lock; cmd_build ;;
    up) build_lock; phase up cmd_up ;;
    down) phase down cmd_down ;;
    load-image) phase load-image cmd_load_image "$@" ;;
    hello) cmd_hello ;;
    env) cmd_env ;;
    status) cmd_status ;;
    *) sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'; [ "$cmd" = help ] || exit 2 ;;
  esac
}
main "$@"; exit $?   # (one line: edits to this file cannot affect a running copy after main returns)
