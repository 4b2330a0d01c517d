#!/usr/bin/env bash
# make kind-up: create the kind cluster (deploy/kind/cluster.yaml), build the CPU image, load it
# into the cluster, apply deploy/overlays/kind and wait until every service is rolled out.
# Re-running reuses the cluster and re-applies (a changed image or config rolls the pods).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

require docker kind kubectl
require_docker_daemon

reused=0
if cluster_exists; then
  log "reusing kind cluster '${CLUSTER}'"
  reused=1
else
  log "creating kind cluster '${CLUSTER}'"
  kind create cluster --name "${CLUSTER}" --config "${KIND_DIR}/cluster.yaml" --wait 180s
fi

image="$(overlay_image)"
log "building ${image} (CPU variant)"
docker build --build-arg VARIANT=cpu --tag "${image}" "${REPO_ROOT}"
log "loading ${image} into '${CLUSTER}'"
kind load docker-image "${image}" --name "${CLUSTER}"

trap 'log "kind-up failed"; dump_logs' ERR
log "applying deploy/overlays/kind"
kubectl --context "${CONTEXT}" apply -k "${OVERLAY}"
if (( reused )); then
  # A rebuilt image keeps its tag: restart so running pods pick up the image just loaded.
  kc rollout restart "deployment/${ACTOR_DEPLOYMENT}" "${SERVER_STATEFULSETS[@]/#/statefulset/}"
fi
wait_rollouts
log "spiral is up in namespace '${NAMESPACE}' of cluster '${CLUSTER}' (context ${CONTEXT})"
