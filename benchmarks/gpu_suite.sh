#!/usr/bin/env bash
# GPU suite: the CUDA tests (Triton kernels compiled, sync-free loop, CUDA graphs) and the kernel and
# end-to-end benchmarks, in one command, < 9 minutes on an H100/H200, nothing downloaded.
#
#   bash benchmarks/gpu_suite.sh            # writes benchmarks/results/gpu/<date>-<gpu>.{json,md}
#
# Uses the machine's python3 (torch with CUDA, triton, pytest). Small wheels it lacks (nvtx; diffusers and
# importlib_metadata for the diffusers comparison) are installed from ./.whl if that folder exists (see
# benchmarks/README.md). Results go to $INDIS_RESULTS, else $OUT (the device tool's output folder), else
# benchmarks/results/gpu, rewritten after every stage (a suite stopped from outside keeps what it measured).
# Each stage has its own time limit, capped so that the whole suite ends by INDIS_SUITE_DEADLINE seconds
# (default 540: the device tool stops a command at 600); a stage that would start too late is recorded as
# skipped; a failing stage is recorded and the suite goes on.
# INDIS_SUITE_STAGES="tests kernel e2e host serving export nvtx" (the default) selects stages and their order
# (run the stages an issue needs first); INDIS_SUITE_TESTS the test paths of the tests stage.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
DEADLINE="${INDIS_SUITE_DEADLINE:-540}"
case "$DEADLINE" in
  ''|*[!0-9]*) echo "gpu_suite: INDIS_SUITE_DEADLINE=$DEADLINE is not a whole number of seconds" >&2; exit 2 ;;
esac
DEADLINE=$((10#$DEADLINE))
DEST="${INDIS_RESULTS:-${OUT:-benchmarks/results/gpu}}"
mkdir -p "$DEST"
WORK="$(mktemp -d)"
SITE="$WORK/site"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_suite: no CUDA device visible to $PY; nothing to measure" >&2
  exit 2
fi
wheels=()
if [ -d .whl ]; then wheels=(.whl/*.whl); fi
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-build-isolation --target "$SITE" "${wheels[@]}" . \
  || { echo "gpu_suite: installing indis failed" >&2; exit 3; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

GPU="$("$PY" -c "import torch; print(torch.cuda.get_device_name())")"
SLUG="$(echo "$GPU" | tr '[:upper:]' '[:lower:]' | sed -e 's/nvidia //' -e 's/[^a-z0-9]\+/-/g' -e 's/-$//')"
STAMP="$(date -u +%Y-%m-%d)-$SLUG${INDIS_SUITE_TAG:+-$INDIS_SUITE_TAG}"  # a tag keeps partial reruns apart
echo "gpu_suite: $GPU -> $DEST/$STAMP.{json,md}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw --format=csv \
  > "$WORK/nvidia-smi.txt" 2>&1 || true

summarize() {  # (re)write $DEST/$STAMP.{json,md} from the stages run so far (a killed suite keeps them)
  "$PY" - "$WORK" "$DEST" "$STAMP" "$GPU" <<'EOF'
import json, pathlib, platform, sys
work, dest, stamp, gpu = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3], sys.argv[4]
import torch, triton
out = {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
       "python": platform.python_version(), "stages": {}}
md = [f"# GPU suite {stamp}", "", f"- GPU: {gpu}; torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {triton.__version__}, Python {platform.python_version()}", ""]
smi = (work / "nvidia-smi.txt")
if smi.exists():
    md += ["```", smi.read_text().strip(), "```", ""]
for name in ("tests", "kernel", "e2e", "host", "serving", "export", "nvtx"):
    rc_file = work / f"{name}.rc"
    if not rc_file.exists():
        continue
    rc, secs = rc_file.read_text().split()
    entry = {"exit": rc, "seconds": int(secs)}
    data = work / f"{name}.json"
    if data.exists():
        try:
            entry["results"] = json.loads(data.read_text())
        except ValueError as e:  # a stage stopped while it wrote
            entry["results_error"] = f"{data.name} is not valid JSON: {e}"
    log = (work / f"{name}.log").read_text() if (work / f"{name}.log").exists() else ""
    if name == "tests":
        entry["summary"] = [l for l in log.splitlines() if " passed" in l or " failed" in l or "error" in l][-3:]
        entry["log_tail"] = log.splitlines()[-60:]
    out["stages"][name] = entry
    md += [f"## {name} (exit {rc}, {secs} s)", "", "```" if name == "tests" else ""]
    body = log.splitlines()
    if name == "tests":
        body = body[-40:]
    md += body + (["```"] if name == "tests" else []) + [""]
for suffix, text in ((".json", json.dumps(out, indent=2)), (".md", "\n".join(md))):
    tmp = dest / f".{stamp}{suffix}.tmp"  # written whole, then renamed: a stop mid-write keeps the last
    tmp.write_text(text)
    tmp.replace(dest / f"{stamp}{suffix}")
print(f"wrote {dest / stamp}.json and .md")
EOF
}

stage() {  # stage NAME LIMIT_S CMD...: run with a time limit (capped by the deadline), keep its log and status
  local name="$1" limit="$2"; shift 2
  local t0=$SECONDS left=$(( DEADLINE - SECONDS - 30 ))  # 30 s kept for a killed stage and the summary
  if [ "$left" -lt 30 ]; then
    echo "skipped: the suite's deadline (${DEADLINE}s) is reached" | tee "$WORK/$name.log"
    echo "skipped 0" > "$WORK/$name.rc"; return
  fi
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  echo "== $name (limit ${limit}s)"
  timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "$rc $((SECONDS - t0))" > "$WORK/$name.rc"
  tail -n 40 "$WORK/$name.log"
  echo "== $name: exit $rc in $((SECONDS - t0)) s"
  summarize
}

STAGES="${INDIS_SUITE_STAGES:-tests kernel e2e host serving export nvtx}"
# INDIS_SUITE_TESTS: a subset reruns only those test paths
TESTS="${INDIS_SUITE_TESTS:-tests/kernels tests/engine/core/test_graphs.py tests/engine/core/test_sampling_callback.py
  tests/export tests/engine/serving}"
for name in $STAGES; do
  case "$name" in
    tests) stage tests 150 "$PY" -m pytest -q -p no:cacheprovider -rs $TESTS ;;
    kernel) stage kernel 150 "$PY" benchmarks/bench_ragged_step.py --json "$WORK/kernel.json" ;;
    e2e) stage e2e 200 "$PY" benchmarks/bench_sampling_e2e.py --json "$WORK/e2e.json" ;;
    host) stage host 150 "$PY" benchmarks/bench_host_overhead.py --device cuda --repeats 100 --rounds 4 \
      --json "$WORK/host.json" ;;  # prepare / indis.sample per solver vs diffusers, B = 1, 16, 64
    serving) stage serving 240 "$PY" benchmarks/bench_serving.py --device cuda --graphs --requests 1024 \
      --capacity 64 --rate inf,2000 --repeats 3 --json "$WORK/serving.json" ;;  # uniform {3,5,7}, allocator mix
    export)  # torch / torch.compile / onnxruntime (CUDA provider, TensorRT: only where installed; says so)
      stage export 240 "$PY" benchmarks/bench_export_backends.py --device cuda --json "$WORK/export.json" ;;
    nvtx)  # NVTX ranges as Nsight Systems sees them (skipped where nsys is not installed)
      if command -v nsys >/dev/null 2>&1; then
        stage nvtx 120 bash -c "nsys profile --trace=cuda,nvtx --force-overwrite true -o '$WORK/indis' \
          '$PY' benchmarks/profile_nvtx.py && nsys stats --report nvtx_sum '$WORK/indis.nsys-rep'"
      else
        echo "nsys not installed on this machine: NVTX stage skipped" > "$WORK/nvtx.log"; echo "0 0" > "$WORK/nvtx.rc"
        cat "$WORK/nvtx.log"
      fi ;;
    *) echo "gpu_suite: unknown stage $name" >&2 ;;
  esac
done

summarize
rm -rf "$WORK"
