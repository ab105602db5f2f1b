# Sourced by build-k8s.sh, testbed.sh and e2e/run.sh: exports the pinned versions of
# versions.env (beside this file), each kept as it is when the environment already sets it.
set -a
eval "$(sed -n 's/^\([A-Z0-9_]*\)=\(.*\)$/\1=${\1:-\2}/p' "$(dirname "${BASH_SOURCE[0]}")/versions.env")"
set +a
