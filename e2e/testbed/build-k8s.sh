#!/usr/bin/env bash
# Builds pinned Kubernetes components, etcd and kind from the Go module proxy into the
# cache ($KCM_CACHE, default /var/cache/kcm-operator), keyed by version. Skips what is built.
# K8S_COMPONENTS (default: all seven) builds a subset into the same place, and then neither
# etcd nor kind: the version matrix needs only kube-apiserver and kube-controller-manager.
set -euo pipefail
# The pinned versions (versions.env), each overridable from the environment.
source "$(dirname "${BASH_SOURCE[0]}")/versions.sh"
CACHE=${KCM_CACHE:-/var/cache/kcm-operator}
export GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local
staging_v="v0.${K8S_VERSION#v1.}"
bin="$CACHE/k8s-$K8S_VERSION/bin"
all_components=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubeadm kubectl kube-proxy)
read -r -a components <<<"${K8S_COMPONENTS:-${all_components[*]}}"
for c in "${components[@]}"; do
  case " ${all_components[*]} " in *" $c "*) ;; *) echo "ERROR: K8S_COMPONENTS: unknown component $c" >&2; exit 1 ;; esac
done

have_all() { for c in "${components[@]}"; do [ -x "$bin/$c" ] || return 1; done; }

if have_all && [ -f "$bin/.complete" ]; then
  echo "k8s $K8S_VERSION: cached in $bin"
else
  rm -rf "$bin"; mkdir -p "$bin"
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  cd "$work"
  go mod init kcm-testbed/k8s >/dev/null 2>&1
  mods=$(curl -fsS "https://proxy.golang.org/k8s.io/kubernetes/@v/$K8S_VERSION.mod" 2>/dev/null \
    || go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p' | xargs cat)
  go mod edit -require "k8s.io/kubernetes@$K8S_VERSION"
  for m in $(printf '%s\n' "$mods" | sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p'); do
    go mod edit -replace "$m=$m@$staging_v"
  done
  cat > tools.go <<'GO'
//go:build tools
package tools
import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kubeadm"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubectl/pkg/cmd"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  go mod tidy >/dev/null
  minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  ld=""
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ld="$ld -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean -X $p.buildDate=2025-01-01T00:00:00Z"
  done
  go build -trimpath -ldflags "-s -w $ld" -o "$bin/" "${components[@]/#/k8s.io/kubernetes/cmd/}"
  touch "$bin/.complete"
  cd /; rm -rf "$work"; trap - EXIT
fi

[ -n "${K8S_COMPONENTS:-}" ] && exit 0

# the etcd image tag kubeadm expects must match what we build
want=$("$bin/kubeadm" config images list --kubernetes-version "$K8S_VERSION" 2>/dev/null | sed -n 's#.*/etcd:\([0-9.]*\)-.*#v\1#p')
if [ -n "$want" ] && [ "$want" != "$ETCD_VERSION" ]; then
  echo "ERROR: kubeadm $K8S_VERSION expects etcd $want but ETCD_VERSION=$ETCD_VERSION; fix ETCD_VERSION" >&2
  exit 1
fi

ebin="$CACHE/etcd-$ETCD_VERSION/bin"
if [ -x "$ebin/etcd" ] && [ -f "$ebin/.complete" ]; then
  echo "etcd $ETCD_VERSION: cached in $ebin"
else
  rm -rf "$ebin"; mkdir -p "$ebin"
  work=$(mktemp -d); cd "$work"
  go mod init kcm-testbed/etcd >/dev/null 2>&1
  # etcd only: etcdctl/etcdutl v3.5.x modules are not served by this machine's Go proxy (403)
  mkdir -p etcd
  printf 'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\nfunc main() { etcdmain.Main(os.Args) }\n' > etcd/main.go
  go mod edit -require "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  go mod tidy >/dev/null
  go build -trimpath -ldflags "-s -w" -o "$ebin/" ./etcd
  touch "$ebin/.complete"
  cd /; rm -rf "$work"
fi

kbin="$CACHE/kind-$KIND_VERSION/bin"
if [ -x "$kbin/kind" ] && [ -f "$kbin/.complete" ]; then
  echo "kind $KIND_VERSION: cached in $kbin"
else
  rm -rf "$kbin"; mkdir -p "$kbin"
  GOBIN="$kbin" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kind@$KIND_VERSION"
  touch "$kbin/.complete"
fi
