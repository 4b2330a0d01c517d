#!/usr/bin/env bash
# make kind-test: end-to-end checks on the cluster that kind-up.sh created.
#   1. every service is rolled out;
#   2. the policy learner trains: spiral_learner_updates_total, read from the learner's metrics
#      endpoint through a port-forward, rises;
#   3. actors scale out: the environment-step rate summed over actor pods rises when the actor
#      Deployment goes from 2 to 4 replicas (then it is scaled back to 2).
# On any failure the cluster state and every pod's log are dumped (see lib.sh: dump_logs).
# Settings: SPIRAL_KIND_WINDOW (seconds per rate measurement, default 30),
# SPIRAL_KIND_WARMUP (seconds after a scale-up before measuring, default 45),
# SPIRAL_KIND_TRAIN_TIMEOUT (seconds to wait for learner updates, default 600).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

WINDOW="${SPIRAL_KIND_WINDOW:-30}"
WARMUP="${SPIRAL_KIND_WARMUP:-45}"
TRAIN_TIMEOUT="${SPIRAL_KIND_TRAIN_TIMEOUT:-600}"

require docker kind kubectl curl
cluster_exists || die "no kind cluster named '${CLUSTER}': run 'make kind-up' first."

FORWARDS=()
cleanup() {
  local pid
  for pid in "${FORWARDS[@]}"; do kill "${pid}" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'log "kind-test FAILED"; dump_logs' ERR

fail() { log "FAIL: $*"; dump_logs; exit 1; }

# metric_sum POD METRIC: sum of every sample of METRIC served by POD's metrics endpoint.
metric_sum() {
  local pod="$1" metric="$2" port pid body="" attempt
  port=$(( 20000 + RANDOM % 20000 ))
  kc port-forward "pod/${pod}" "${port}:${METRICS_PORT}" >/dev/null 2>&1 &
  pid=$!
  FORWARDS+=("${pid}")
  for attempt in $(seq 1 20); do
    if body="$(curl --silent --fail --max-time 5 "http://127.0.0.1:${port}/metrics")"; then break; fi
    body=""
    sleep 0.5
  done
  kill "${pid}" 2>/dev/null || true
  wait "${pid}" 2>/dev/null || true
  [[ -n "${body}" ]] || { log "could not read metrics of pod/${pod}"; return 1; }
  awk -v m="${metric}" '$1 == m || index($1, m "{") == 1 { s += $NF } END { printf "%.1f\n", s }' <<<"${body}"
}

greater() { awk -v a="$1" -v b="$2" 'BEGIN { exit !(a > b) }'; }

running_actor_pods() {
  kc get pods --selector "${ACTOR_SELECTOR}" --field-selector status.phase=Running \
    -o jsonpath='{range .items[*]}{.metadata.name}{"\n"}{end}'
}

# env_step_rate: environment steps per second summed over the running actor pods, measured
# over WINDOW seconds (a counter that went down, i.e. a restarted actor, counts from zero).
env_step_rate() {
  local pods pod rate=0
  local -A before=()
  pods="$(running_actor_pods)"
  for pod in ${pods}; do before["${pod}"]="$(metric_sum "${pod}" spiral_actor_env_steps_total)"; done
  sleep "${WINDOW}"
  for pod in ${pods}; do
    local after
    after="$(metric_sum "${pod}" spiral_actor_env_steps_total)"
    rate="$(awk -v r="${rate}" -v a="${after}" -v b="${before[${pod}]}" -v w="${WINDOW}" \
      'BEGIN { d = a - b; if (d < 0) d = a; printf "%.2f", r + d / w }')"
  done
  echo "${rate}"
}

log "1/3 rollouts"
wait_rollouts

log "2/3 the learner trains"
learner_pod="spiral-learner-0"
first="$(metric_sum "${learner_pod}" spiral_learner_updates_total)"
log "spiral_learner_updates_total = ${first}"
deadline=$(( SECONDS + TRAIN_TIMEOUT ))
while :; do
  sleep 10
  now="$(metric_sum "${learner_pod}" spiral_learner_updates_total)"
  if greater "${now}" "${first}"; then
    log "spiral_learner_updates_total rose: ${first} -> ${now}"
    break
  fi
  (( SECONDS < deadline )) || fail "spiral_learner_updates_total stayed at ${now} for ${TRAIN_TIMEOUT}s"
done

log "3/3 scaling actors 2 -> 4 raises the environment-step rate"
kc scale "deployment/${ACTOR_DEPLOYMENT}" --replicas=2
kc rollout status "deployment/${ACTOR_DEPLOYMENT}" --timeout="${ROLLOUT_TIMEOUT}"
rate_two="$(env_step_rate)"
log "2 actors: ${rate_two} env steps/s"
greater "${rate_two}" 0 || fail "2 actors executed no environment steps in ${WINDOW}s"

kc scale "deployment/${ACTOR_DEPLOYMENT}" --replicas=4
kc rollout status "deployment/${ACTOR_DEPLOYMENT}" --timeout="${ROLLOUT_TIMEOUT}"
log "4 actors ready; warming up for ${WARMUP}s"
sleep "${WARMUP}"
rate_four="$(env_step_rate)"
log "4 actors: ${rate_four} env steps/s"
greater "${rate_four}" "${rate_two}" \
  || fail "the environment-step rate did not rise with 4 actors (${rate_two} -> ${rate_four} steps/s)"

kc scale "deployment/${ACTOR_DEPLOYMENT}" --replicas=2
log "PASS: learner updates rose; env steps/s ${rate_two} (2 actors) -> ${rate_four} (4 actors)"
