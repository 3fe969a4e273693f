#!/usr/bin/env bash
# Submit `galaxalign train|tune` to a Ray cluster with `ray job submit`; waits, streams logs, exits with the job's status.
#
#   cluster/submit.sh train CONFIG [extra galaxalign train args]    e.g. train galaxy10_vitb16 --set engine.num_workers=8
#   cluster/submit.sh tune SPACE.yaml [extra galaxalign tune args]  e.g. tune tune/galaxy10_gpu.yaml --out /shared/runs/tune/g10
#
# Environment:
#   RAY_ADDRESS      the cluster's job API (default http://127.0.0.1:8265: the SSH tunnel of `ray dashboard
#                    cluster/aws-gpu.yaml`, or `kubectl port-forward svc/galaxalign-head-svc 8265:8265`)
#   RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token
#                    the cluster's token; when one is present and RAY_AUTH_MODE is unset, RAY_AUTH_MODE=token is
#                    exported, because the job client only sends the token in token mode (else: 401 Unauthorized)
#   SUBMIT_NO_WAIT=1 return right after submitting (follow with the printed `ray job logs -f` command)
#   RAY              the ray executable (default: ray on PATH)
# Paths in the arguments are read on the cluster: use shared storage (NFS path, s3://) for data.path, --out and
# run.out_dir; the repository itself is shipped as the job's working directory (see cluster/runtime_env.yaml).
set -euo pipefail

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}
[[ $# -ge 2 ]] || usage
command=$1
config=$2
shift 2
case "$command" in
  train | tune) ;;
  *) usage ;;
esac

# The repository root is the working directory shipped with the job (relative tune/*.yaml paths resolve there).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ray_bin=${RAY:-ray}
address=${RAY_ADDRESS:-http://127.0.0.1:8265}

if [[ -z "${RAY_AUTH_MODE:-}" ]] &&
  { [[ -n "${RAY_AUTH_TOKEN:-}" ]] || [[ -n "${RAY_AUTH_TOKEN_PATH:-}" ]] || [[ -s "$HOME/.ray/auth_token" ]]; }; then
  export RAY_AUTH_MODE=token
fi

# Our own submission id, so it can be printed before the (possibly hours-long) log stream starts.
job_id="galaxalign-${command}-$(date +%Y%m%d-%H%M%S)-${RANDOM}"
echo "submitting Ray job ${job_id} to ${address}: galaxalign ${command} --config ${config} $*"
echo "  follow logs:  ${ray_bin} job logs --address ${address} --follow ${job_id}"
echo "  status:       ${ray_bin} job status --address ${address} ${job_id}"
echo "  stop:         ${ray_bin} job stop --address ${address} ${job_id}"

submit() {
  "$ray_bin" job submit \
    --address "$address" \
    --submission-id "$job_id" \
    --working-dir . \
    --runtime-env cluster/runtime_env.yaml \
    --no-wait \
    -- galaxalign "$command" --config "$config" "$@"
}

# Submit without waiting, retrying while the head is still starting its job agent ("No available agent")
# or unreachable for a moment; the fixed submission id makes a retry safe ("already exists" = submitted).
for attempt in 1 2 3 4 5 6; do
  if out=$(submit "$@" 2>&1); then
    break
  fi
  if grep -q "already exists" <<<"$out"; then
    break
  fi
  if [[ $attempt -lt 6 ]] && grep -qiE "No available agent|Connection refused|Failed to connect|Max retries exceeded" <<<"$out"; then
    echo "job API not ready (attempt ${attempt}); retrying in 5 s" >&2
    sleep 5
    continue
  fi
  echo "$out" >&2
  echo "submitting ${job_id} failed" >&2
  exit 1
done
if [[ "${SUBMIT_NO_WAIT:-0}" == "1" ]]; then
  echo "submitted ${job_id}"
  exit 0
fi

# Stream the logs until the job ends. Ctrl-C stops following, not the job: it keeps running on the cluster.
"$ray_bin" job logs --address "$address" --follow "$job_id" || true
status=""
for _ in $(seq 60); do
  # `ray job status` ends with "Job '<id>' succeeded|failed|was stopped" for a finished job (its logger
  # may write to stderr); a running one prints "Status for job ...: RUNNING".
  status=$("$ray_bin" job status --address "$address" "$job_id" 2>&1 |
    grep -oE "Job '${job_id}' (succeeded|failed|was stopped)" | tail -1 | awk '{print toupper($NF)}' || true)
  [[ -n "$status" ]] && break
  sleep 2
done
if [[ "$status" == "SUCCEEDED" ]]; then
  echo "job ${job_id} succeeded"
  exit 0
fi
echo "job ${job_id} did not succeed (${status:-status unknown}); logs: ${ray_bin} job logs --address ${address} ${job_id}" >&2
exit 1
