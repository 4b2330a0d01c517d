#!/usr/bin/env bash
# make kind-down: delete the kind cluster created by kind-up.sh (its volumes go with it).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

require kind
if cluster_exists; then
  log "deleting kind cluster '${CLUSTER}'"
  kind delete cluster --name "${CLUSTER}"
else
  log "no kind cluster named '${CLUSTER}'; nothing to delete"
fi
