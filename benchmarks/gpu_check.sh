#!/usr/bin/env bash
# One short job on this machine as a single host, using every GPU it has (platform cuda), or, on a
# machine without a GPU, the CPU (2 forced devices). Prints the median step time, tokens/s and the
# time a step is blocked by an asynchronous checkpoint save.
#   bash benchmarks/gpu_check.sh            (MODEL=small STEPS=40 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-small}
STEPS=${STEPS:-40}
PYTHON=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
fi
if [ "$gpus" -gt 0 ]; then
  platform=cuda devices=$gpus resources="{CPU: 1, GPU: $gpus}"
else
  platform=cpu devices=2 resources="{CPU: 1}"
  echo "no GPU found: CPU fallback with 2 devices"
fi
cat > "$work/config.yaml" <<YAML
num_hosts: 1
mesh: {data: -1, model: 1}
cluster: {platform: $platform, devices_per_host: $devices, resources_per_host: $resources, placement_strategy: PACK}
config: {model: $MODEL, global_batch_size: $((8 * devices)), seq_len: 128}
train: {steps: $STEPS}
checkpoint: {save_every: 10, max_to_keep: 2}
YAML
"$PYTHON" launch.py --config "$work/config.yaml" --run-dir "$work/run" > "$work/launch.log" 2>&1 || {
  cat "$work/launch.log"; exit 1; }
"$PYTHON" - "$work/run" "$platform" "$devices" <<'PY'
import json, pathlib, statistics, sys
run, platform, devices = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
steady = [r for r in records[2:] if r.get("step_time_s")]  # the first steps pay for warm-up
blocking = [r["checkpoint_blocking_s"] for r in records if "checkpoint_blocking_s" in r]
summary = json.loads((run / "summary.json").read_text())
print(f"platform {platform} x {devices} devices, model {summary['returned']['model']}, {summary['final_step']} steps, "
      f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}")
print(f"step time          {statistics.median(r['step_time_s'] for r in steady) * 1000:.1f} ms (median)")
print(f"tokens/s           {statistics.median(r['tokens_per_s'] for r in steady):,.0f} (median)")
print(f"checkpoint blocks  {statistics.median(blocking) * 1000:.1f} ms (median of {len(blocking)} async saves)")
print(f"cold start         {summary['cold_start_s']:.1f} s (launch to first step)")
PY
