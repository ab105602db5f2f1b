#!/bin/sh
# kcm-operator test bed: write this kind node's CNI config at boot (no kindnetd).
# A bridge on each node with host-local IPs from 10.244.<last octet of the node IP>.0/24,
# so pod IPs differ between nodes. Pods are not routed between nodes (not needed: the
# product's pods are hostNetwork; ordinary pods only need to start).
set -eu
ip4=$(ip -4 -o addr show dev eth0 2>/dev/null | awk '{print $4}' | cut -d/ -f1 | head -1)
octet=${ip4##*.}
[ -n "$octet" ] || octet=1
mkdir -p /etc/cni/net.d
cat > /etc/cni/net.d/10-kcm-bridge.conflist <<CONF
{
  "cniVersion": "1.0.0",
  "name": "kcm-bridge",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "kcmbr0",
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [[{ "subnet": "10.244.${octet}.0/24" }]],
        "routes": [{ "dst": "0.0.0.0/0" }]
      }
    },
    { "type": "portmap", "capabilities": { "portMappings": true } }
  ]
}
CONF
