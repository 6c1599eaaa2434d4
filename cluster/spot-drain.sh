#!/usr/bin/env bash
# Turn a cloud's reclaim notice for this VM into a Ray drain of this node (reason PREEMPTION, with the
# deadline). Ray Train's preemption watcher then tells the job, which checkpoints at once and keeps
# training until just before the deadline (see cluster/README.md). The launcher configs start it in the
# background on every spot worker:  nohup cluster/spot-drain.sh aws|gcp &
# Kubernetes needs no such script: a pod's SIGTERM already drains its Ray node (see kuberay-raycluster.yaml).
set -u
cloud=${1:?usage: spot-drain.sh aws|gcp [head-address]}
address=${2:-${RAY_HEAD_IP:-127.0.0.1}:6379}
node_id=$(python -c "import ray; ray.init(address='auto', logging_level='ERROR'); print(ray.get_runtime_context().get_node_id())")

while true; do
  case "$cloud" in
    aws)  # spot/instance-action answers (instead of 404) two minutes before the reclaim
      token=$(curl -s -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 60" http://169.254.169.254/latest/api/token)
      if curl -sf -H "X-aws-ec2-metadata-token: $token" \
          http://169.254.169.254/latest/meta-data/spot/instance-action >/dev/null; then
        deadline=110; break
      fi ;;
    gcp)  # instance/preempted turns TRUE 30 seconds before the reclaim
      if [ "$(curl -s -H 'Metadata-Flavor: Google' \
          http://metadata.google.internal/computeMetadata/v1/instance/preempted)" = TRUE ]; then
        deadline=25; break
      fi ;;
    *) echo "spot-drain.sh: unknown cloud $cloud (aws or gcp)" >&2; exit 2 ;;
  esac
  sleep 5
done
ray drain-node --address "$address" --node-id "$node_id" --reason DRAIN_NODE_REASON_PREEMPTION \
  --reason-message "$cloud spot reclaim" --deadline-remaining-seconds "$deadline"
