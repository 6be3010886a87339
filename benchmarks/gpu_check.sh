#!/usr/bin/env bash
# One prepared check for a lent GPU (H100/H200 class), under 8 minutes, writing ONE JSON file:
#   device  - GPU name, capability, torch/CUDA/cuDNN versions
#   gpu_tests - `pytest -k gpu`: CUDA determinism, cuDNN switch, graph vs eager bit-identity,
#             sync-free epochs (torch.cuda.set_sync_debug_mode), fp32/TF32 flags, arch check
#   step_modes - ResNet-14 images/s at batch 512 per mode (fp32 NCHW/NHWC, tf32, amp_fp16,
#             amp_bf16, graph), deterministic kernels, ratios to fp32 NCHW (benchmarks/step_modes.py)
#   packing - K = 1/2/4 runs per GPU vs K runs in turn, with/without MPS, bit-identity (benchmarks/packing.py)
#   repeatability - the questions the paper's table depends on (benchmarks/repeatability.py):
#             cudnn.differ / first_differing_after_steps: do two source=cudnn runs with the same seed
#             differ on this GPU, and after how many optimizer steps; control.bit_identical: are two
#             determinism-control runs trained in two processes bit-identical
#   record_overhead - one recorded trajectory point against one training step, and the overhead of the
#             default grid (target <= 3 %), digits and CIFAR-shaped ResNet-14 (benchmarks/record_overhead.py)
# Results go to $OUT/gpu_check.json when OUT is set, else ./gpu_check.json; each section's log
# and exit status are kept in the JSON too, so a failing section does not hide the others.
# `answers` at the top of the JSON collects the yes/no questions and what would turn
# train.cuda_graph=auto on (docs/performance.md, "auto").
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --cpu-smoke  # here: every CPU-capable mode for 2 steps, no GPU tests
#
# Time limits apply on the GPU machine only (its lease is short); the CPU smoke has none, so a
# loaded machine makes it slower, never failed.
#
# More sections: define a function that writes "$PARTS/<name>.json" and add one
# `run_section <name> <seconds> <function>` line in the SECTIONS block at the end; the merge
# step picks every part up by its name.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$REPO/src${PYTHONPATH:+:$PYTHONPATH}"
MODE=gpu
if [[ "${1:-}" == "--cpu-smoke" ]]; then MODE=cpu-smoke; elif [[ -n "${1:-}" ]]; then
  echo "usage: bash benchmarks/gpu_check.sh [--cpu-smoke]" >&2; exit 2; fi
DEST="${OUT:-.}/gpu_check.json"
PARTS="$(mktemp -d)"
trap 'rm -rf "$PARTS"' EXIT
PY="${PYTHON:-python}"
export REPO MODE PARTS PY
FAILED=0

run_section() {  # name, time limit (s, GPU mode only), function: the function writes $PARTS/<name>.json
  local name="$1" limit="$2" fn="$3"
  local t0=$SECONDS
  export -f "$fn"
  if [[ "$MODE" == cpu-smoke ]]; then  # no limit: the smoke checks that it works, not how fast
    echo "== $name"
    bash -c "$fn" >"$PARTS/$name.log" 2>&1
  else
    echo "== $name (limit ${limit}s)"
    timeout "$limit" bash -c "$fn" >"$PARTS/$name.log" 2>&1
  fi
  local rc=$?
  [[ $rc -ne 0 ]] && FAILED=1
  echo "{\"rc\": $rc, \"seconds\": $((SECONDS - t0))}" >"$PARTS/$name.status"
  tail -n 15 "$PARTS/$name.log"
}

section_device() {
  "$PY" - "$PARTS/device.json" <<'PYEOF'
import json, sys, torch
from nondet_hpc.run.cpuinfo import cpu_record
d = {"type": "cuda" if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
     "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "threads": torch.get_num_threads(),
     "cpu": cpu_record()}
if d["type"] == "cuda":
    d.update(name=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
             arch_list=torch.cuda.get_arch_list())
json.dump(d, open(sys.argv[1], "w"), indent=2)
print(d)
PYEOF
}

section_gpu_tests() {
  if [[ "$MODE" == cpu-smoke ]]; then
    echo '{"skipped": "cpu-smoke: the GPU tests skip without CUDA (they run in the CPU suite as skips)"}' \
      >"$PARTS/gpu_tests.json"; return 0; fi
  # not gpu_check: this script's own CPU smoke test; not without_gpu: it assumes a machine without one
  (cd "$REPO" && "$PY" -m pytest tests -m "not slurm" -k "gpu and not gpu_check and not without_gpu" -q -p no:cacheprovider -rA \
     --junitxml="$PARTS/gpu_tests.xml")
  local rc=$?
  "$PY" - "$PARTS/gpu_tests.xml" "$PARTS/gpu_tests.json" "$rc" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
cases = {}
for c in root.iter("testcase"):
    state = "passed"
    for tag in ("failure", "error", "skipped"):
        if c.find(tag) is not None:
            state = tag
    cases[f"{c.get('classname')}::{c.get('name')}"] = state
count = {s: sum(v == s for v in cases.values()) for s in ("passed", "failure", "error", "skipped")}
json.dump({"pytest_rc": int(sys.argv[3]), "counts": count, "cases": cases}, open(sys.argv[2], "w"), indent=2)
PYEOF
  return $rc
}

section_step_modes() {
  if [[ "$MODE" == cpu-smoke ]]; then
    "$PY" "$REPO/benchmarks/step_modes.py" --device cpu --batch 64 --steps 2 --warmup 1 --json "$PARTS/step_modes.json"
  else
    "$PY" "$REPO/benchmarks/step_modes.py" --device cuda --batch 512 --steps 50 --warmup 5 --json "$PARTS/step_modes.json"
  fi
}

section_packing() {  # K = 1/2/4 runs per GPU (with an MPS row where nvidia-cuda-mps-control exists),
  # each packed run checked bit-identical to its solo run; digits, since the lent machine has no CIFAR
  if [[ "$MODE" == cpu-smoke ]]; then
    "$PY" "$REPO/benchmarks/packing.py" --device cpu --epochs 1 --ks 1,2 --repeats 1 --json "$PARTS/packing.json"
  else
    "$PY" "$REPO/benchmarks/packing.py" --device cuda --epochs 3 --ks 1,2,4 --repeats 1 --json "$PARTS/packing.json"
  fi
}

section_repeatability() {
  if [[ "$MODE" == cpu-smoke ]]; then
    "$PY" "$REPO/benchmarks/repeatability.py" --device cpu --epochs 1 --subset 128 --json "$PARTS/repeatability.json"
  else
    "$PY" "$REPO/benchmarks/repeatability.py" --device cuda --epochs 3 --json "$PARTS/repeatability.json"
  fi
}

section_record_overhead() {  # the trajectory recording (instability records): one point vs one step
  if [[ "$MODE" == cpu-smoke ]]; then
    "$PY" "$REPO/benchmarks/record_overhead.py" --models digits-resnet14 --steps 1 --points 1 --repeats 1 \
      --json "$PARTS/record_overhead.json"
  else
    "$PY" "$REPO/benchmarks/record_overhead.py" --device cuda --steps 20 --points 10 --repeats 3 \
      --json "$PARTS/record_overhead.json"
  fi
}

merge() {
  "$PY" - "$PARTS" "$DEST" "$MODE" <<'PYEOF'
import json, os, sys, time
parts, dest, mode = sys.argv[1:4]
out = {"mode": mode, "time": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {}}
for f in sorted(os.listdir(parts)):
    name, ext = os.path.splitext(f)
    path = os.path.join(parts, f)
    if ext == ".json":
        out[name] = json.load(open(path))
    elif ext == ".status":
        out["sections"].setdefault(name, {}).update(json.load(open(path)))
    elif ext == ".log":
        out["sections"].setdefault(name, {})["log_tail"] = open(path, errors="replace").read()[-4000:]
rep, modes, tests = out.get("repeatability") or {}, out.get("step_modes") or {}, (out.get("gpu_tests") or {}).get("cases") or {}
graph_tests = {k: v for k, v in tests.items() if "graph_replay_is_bit_identical" in k}
graph = modes.get("graph") or {}
out["answers"] = {
    "cudnn_runs_same_seed_differ": (rep.get("cudnn") or {}).get("differ"),
    "cudnn_first_differing_after_steps": (rep.get("cudnn") or {}).get("first_differing_after_steps"),
    "control_runs_two_processes_bit_identical": (rep.get("control") or {}).get("bit_identical"),
    "record_overhead_pct": {r["model"]: 100 * r["overhead"] for r in (out.get("record_overhead") or {}).get("results") or []},
    "cuda_graph_replay_bit_identical": (all(v == "passed" for v in graph_tests.values()) if graph_tests else None),
    "cuda_graph_ratio_to_fp32_nchw": graph.get("ratio_to_fp32_nchw"),
    "turn_cuda_graph_auto_on": (bool(graph_tests) and all(v == "passed" for v in graph_tests.values())
                                and (graph.get("ratio_to_fp32_nchw") or 0) > 1),
}
tmp = dest + ".tmp"
with open(tmp, "w") as fh:
    json.dump(out, fh, indent=2)
os.replace(tmp, dest)  # atomic: a half-written file never stands in for the results
print(f"wrote {dest}")
PYEOF
}

# --- SECTIONS (each bounded on the GPU; the sum stays under 10 minutes on an H100/H200) --------
run_section device 60 section_device
run_section gpu_tests 300 section_gpu_tests
run_section step_modes 120 section_step_modes
run_section packing 150 section_packing
run_section repeatability 120 section_repeatability
run_section record_overhead 90 section_record_overhead
merge
exit $FAILED
