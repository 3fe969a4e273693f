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

wait_flag=()
if [[ "${SUBMIT_NO_WAIT:-0}" == "1" ]]; then
  wait_flag=(--no-wait)
fi

set +e
# Ctrl-C stops following the logs, not the job: it keeps running on the cluster (stop it with the command above).
"$ray_bin" job submit \
  --address "$address" \
  --submission-id "$job_id" \
  --working-dir . \
  --runtime-env cluster/runtime_env.yaml \
  "${wait_flag[@]}" \
  -- galaxalign "$command" --config "$config" "$@"
status=$?
set -e
if [[ ${#wait_flag[@]} -eq 0 ]]; then
  if [[ $status -eq 0 ]]; then
    echo "job ${job_id} succeeded"
  else
    echo "job ${job_id} did not succeed (exit ${status}); logs: ${ray_bin} job logs --address ${address} ${job_id}" >&2
  fi
fi
exit "$status"
