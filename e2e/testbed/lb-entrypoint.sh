#!/bin/sh
# kcm-operator test bed: entrypoint (PID 1) of the locally built kind load balancer image.
# kind writes its haproxy config (global maxconn 100000, i.e. ~200k file descriptors) and then
# sends SIGHUP to PID 1. Where the open-files limit is lower (20000 on these VMs, and not
# raisable), haproxy refuses to start. So run haproxy on a copy of the config with maxconn
# clamped to what the limit allows, re-render it on SIGHUP and pass the reload on.
CFG=${1:-/usr/local/etc/haproxy/haproxy.cfg}
RUN=/tmp/haproxy-effective.cfg
lim=$(ulimit -n)
case "$lim" in unlimited) lim=1048576 ;; esac
max=$(( (lim - 200) / 2 ))
render() {
  awk -v max="$max" '$1 == "maxconn" && $2 + 0 > max { sub(/maxconn[ \t]+[0-9]+/, "maxconn " max) } { print }' "$CFG" > "$RUN.new" \
    && mv "$RUN.new" "$RUN"
}
render
haproxy -W -db -f "$RUN" &
pid=$!
trap 'render; kill -HUP $pid' HUP
trap 'kill -USR1 $pid' TERM INT USR1
while kill -0 "$pid" 2>/dev/null; do
  wait "$pid"; rc=$?
done
exit "$rc"
