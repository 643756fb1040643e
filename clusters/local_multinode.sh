#!/usr/bin/env bash
# The local multi-node Ray cluster: clusters/local_multinode.sh up|down|status|kill [key=value ...]
# e.g. `clusters/local_multinode.sh up cluster.nodes.workers=3`, `... kill node=worker-1`.
# Runs `timfusion cluster ACTION cluster=local_multinode` from the project's environment.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$here/.venv/bin/timfusion"
[[ -x "$bin" ]] || bin="timfusion"
action="${1:-status}"
shift || true
exec "$bin" cluster "$action" cluster=local_multinode "$@"
