# Shared by kind-up.sh, kind-test.sh and kind-down.sh (sourced, not run).
# Settings (environment variables):
#   SPIRAL_KIND_CLUSTER       cluster name (default: spiral)
#   SPIRAL_KIND_TIMEOUT       rollout timeout, e.g. 600s (default: 600s)
#   SPIRAL_KIND_LOG_DIR       where logs are dumped on failure (default: runs/kind-logs/TIMESTAMP)

KIND_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${KIND_DIR}/../.." && pwd)"
OVERLAY="${REPO_ROOT}/deploy/overlays/kind"
CLUSTER="${SPIRAL_KIND_CLUSTER:-spiral}"
CONTEXT="kind-${CLUSTER}"
# The namespace deploy/overlays/kind sets (tests/test_deploy.py checks they agree).
NAMESPACE="spiral"
ROLLOUT_TIMEOUT="${SPIRAL_KIND_TIMEOUT:-600s}"
SERVER_STATEFULSETS=(spiral-replaybuffer spiral-discriminator spiral-learner)
ACTOR_DEPLOYMENT="spiral-actor"
ACTOR_SELECTOR="app.kubernetes.io/name=spiral,app.kubernetes.io/component=actor"
METRICS_PORT=9000

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { printf '%s: error: %s\n' "$(basename "$0")" "$*" >&2; exit 2; }

# require TOOL...: stop with a clear message when a tool is missing.
require() {
  local tool
  for tool in "$@"; do
    if ! command -v "${tool}" >/dev/null 2>&1; then
      case "${tool}" in
        kind) die "'kind' is not installed (https://kind.sigs.k8s.io/docs/user/quick-start/#installation); the kind targets need Docker and kind." ;;
        docker) die "'docker' is not installed; the kind targets need a Docker engine and kind." ;;
        *) die "'${tool}' is not installed; the kind targets need it." ;;
      esac
    fi
  done
}

require_docker_daemon() {
  docker info >/dev/null 2>&1 \
    || die "Docker is installed but its daemon is not reachable ('docker info' failed); start Docker first."
}

cluster_exists() { kind get clusters 2>/dev/null | grep -qx "${CLUSTER}"; }

kc() { kubectl --context "${CONTEXT}" --namespace "${NAMESPACE}" "$@"; }

# The one image the kind overlay runs (read from the rendered overlay, so it cannot drift).
overlay_image() {
  local images
  images="$(kubectl kustomize "${OVERLAY}" | awk '$1 == "image:" || $2 == "image:" {print $NF}' | sort -u)"
  [[ -n "${images}" && "$(wc -l <<<"${images}")" -eq 1 ]] \
    || die "expected exactly one image in deploy/overlays/kind, found: ${images:-none}"
  echo "${images}"
}

wait_rollouts() {
  local name
  for name in "${SERVER_STATEFULSETS[@]}"; do
    log "waiting for statefulset/${name} (timeout ${ROLLOUT_TIMEOUT})"
    kc rollout status "statefulset/${name}" --timeout="${ROLLOUT_TIMEOUT}"
  done
  log "waiting for deployment/${ACTOR_DEPLOYMENT} (timeout ${ROLLOUT_TIMEOUT})"
  kc rollout status "deployment/${ACTOR_DEPLOYMENT}" --timeout="${ROLLOUT_TIMEOUT}"
}

# Everything needed to tell why a run failed: objects, events, descriptions and every
# container's log (and the previous container's, after a restart), to stderr and to files.
dump_logs() {
  local dir="${SPIRAL_KIND_LOG_DIR:-${REPO_ROOT}/runs/kind-logs/$(date +%Y%m%d-%H%M%S)}"
  mkdir -p "${dir}"
  log "dumping cluster state and logs to ${dir}"
  kc get all,pvc,configmaps,networkpolicies,poddisruptionbudgets -o wide >"${dir}/objects.txt" 2>&1 || true
  kc get events --sort-by=.lastTimestamp >"${dir}/events.txt" 2>&1 || true
  kc describe pods >"${dir}/pods-describe.txt" 2>&1 || true
  local pod
  for pod in $(kc get pods -o name 2>/dev/null); do
    kc logs "${pod}" --all-containers --prefix --tail=400 >"${dir}/${pod#pod/}.log" 2>&1 || true
    kc logs "${pod}" --all-containers --prefix --tail=400 --previous >"${dir}/${pod#pod/}.previous.log" 2>/dev/null \
      || rm -f "${dir}/${pod#pod/}.previous.log"
  done
  {
    echo "===== objects"; cat "${dir}/objects.txt"
    echo "===== events (last 40)"; tail -n 40 "${dir}/events.txt"
    for f in "${dir}"/*.log; do
      [[ -e "${f}" ]] || continue
      echo "===== $(basename "${f}") (last 60 lines)"; tail -n 60 "${f}"
    done
  } >&2
}
