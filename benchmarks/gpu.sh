#!/usr/bin/env bash
# fxtile's checks on a CUDA machine, in one go (made for one lent H200; any CUDA machine works).
#
#   bash benchmarks/gpu.sh [RESULTS_DIR]     # from anywhere; results in RESULTS_DIR, else $OUT, else gpu-results/
#
# Parts, each under `timeout`, each recorded in summary.md with its status and seconds; a part that
# fails or times out is recorded and the next one runs:
#   0. env        device, driver and package versions (env.txt); installs a carried Liger-Kernel wheel
#   1. tests      tests/test_cuda.py: bf16/fp16 vs fp64, dropout replay on the CUDA generator, autocast,
#                 the loss head and its peak memory, torch.compile with inductor (test_cuda.txt)
#   2. mlp        benchmarks/mlp.py, 32K tokens, bf16, Llama-3-8B MLP (H=4096, I=14336) (mlp.txt)
#      loss       benchmarks/loss.py, 32K tokens, bf16, Llama-3 head (H=4096, V=128256) (loss.txt)
#   3. step       benchmarks/step.py --seq 8192 16384 32768, if present (step.txt)
#   4. accumulate benchmarks/accumulate.py: bf16 weight-gradient sums vs fp64, Llama-3-8B MLP (accumulate.txt)
#
# Never installs from a registry (the GPU machine reaches none). Peers: DeepSpeed's TiledMLP runs only if
# deepspeed imports; torch's chunked linear_cross_entropy only if torch has it (2.13+); Liger-Kernel only if
# it imports or a wheel lies in shared/wheels/ or .whl/ (pure Python: `pip download --no-deps liger-kernel
# -d .whl` here, then name .whl in the device run's carry). It goes to /tmp, never into the system.
#
# Time: the whole script stays under GPU_BUDGET_S seconds (default 450): each part gets its cap or what
# is left, whichever is less. GPU_ROUNDS (default 1): fresh-process rounds per benchmark implementation
# (each round: one process for the peak, one for the time, the median of 3 timed steps).

set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
RESULTS=${1:-${OUT:-gpu-results}}
mkdir -p "$RESULTS" || exit 1
RESULTS=$(cd "$RESULTS" && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_BUDGET_S:-450}
ROUNDS=${GPU_ROUNDS:-1}
START=$(date +%s)
SUMMARY=$RESULTS/summary.md
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
FAILED=()

say() { echo "$*" | tee -a "$SUMMARY"; }
left() { echo $((BUDGET - ($(date +%s) - START))); }

# part NAME CAP_S FILE COMMAND...: run COMMAND under timeout (its cap or the time left), output to FILE.
part() {
    local name=$1 cap=$2 file=$3 rc status t0 limit
    shift 3
    limit=$(left)
    ((limit > cap)) && limit=$cap
    if ((limit < 20)); then
        say "| $name | skipped: ${limit}s of the ${BUDGET}s budget left | 0 | - |"
        FAILED+=("$name")
        return 1
    fi
    echo "=== $name (at most ${limit}s): $*"
    t0=$(date +%s)
    timeout --kill-after=5 "$limit" "$@" >"$RESULTS/$file" 2>&1
    rc=$?
    case $rc in
        0) status=ok ;;
        124 | 137) status="timed out after ${limit}s" ;;
        *) status="failed (exit $rc)" ;;
    esac
    [[ $rc == 0 ]] || FAILED+=("$name")
    say "| $name | $status | $(($(date +%s) - t0)) | $file |"
    return $rc
}

: >"$SUMMARY"
say "# fxtile GPU run, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
say ""

# --- 0. device and versions, first ---------------------------------------------------------------------
{
    echo "## device"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
    else
        echo "nvidia-smi: not on the PATH"
    fi
    echo
    echo "## code"
    if git rev-parse --git-dir >/dev/null 2>&1; then
        echo "commit $(git rev-parse HEAD)"
        git status --short -- fxtile passes tests benchmarks | sed 's/^/  /'
    else
        echo "no git metadata (a copy of the working tree)"
    fi
    echo "sha256 of fxtile/ and passes/ sources: $(find fxtile passes -name '*.py' | LC_ALL=C sort | xargs cat | sha256sum | cut -c1-16)"
} >"$RESULTS/env.txt" 2>&1

# Liger-Kernel: importable already, or a carried wheel installed offline into /tmp.
LIGER_SITE=/tmp/fxtile-gpu-liger
if ! "$PY" -c "import liger_kernel" >/dev/null 2>&1; then
    shopt -s nullglob
    wheels=(shared/wheels/liger_kernel-*.whl .whl/liger_kernel-*.whl)
    shopt -u nullglob
    if ((${#wheels[@]})); then
        echo "installing ${wheels[0]} offline into $LIGER_SITE" >>"$RESULTS/env.txt"
        timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$LIGER_SITE" \
            "${wheels[0]}" >>"$RESULTS/env.txt" 2>&1 && export PYTHONPATH="$PYTHONPATH:$LIGER_SITE"
    else
        echo "no Liger-Kernel wheel in shared/wheels/ or .whl/: Liger peers skipped" >>"$RESULTS/env.txt"
    fi
fi

timeout 90 "$PY" - >>"$RESULTS/env.txt" 2>&1 <<'EOF'
import importlib, importlib.metadata, platform
print("## python", platform.python_version(), platform.machine())
try:
    import torch
    import torch.nn.functional as F
except Exception as exc:
    print("torch: does not import:", exc)
    raise SystemExit(0)
print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs")
print("torch.nn.functional.linear_cross_entropy:", hasattr(F, "linear_cross_entropy"))
for name, dist in (("transformers", "transformers"), ("triton", "triton"), ("peft", "peft"), ("accelerate", "accelerate"),
                   ("networkx", "networkx"), ("hypothesis", "hypothesis"), ("pytest", "pytest"), ("deepspeed", "deepspeed"),
                   ("liger_kernel", "liger-kernel")):
    try:
        module = importlib.import_module(name)
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            version = getattr(module, "__version__", "?")
        print(name, version, "from", module.__file__)
    except Exception as exc:
        print(name, "not importable:", type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
EOF
cat "$RESULTS/env.txt"
say ""
say "| part | status | seconds | output |"
say "|---|---|---|---|"
say "| env | ok | $(($(date +%s) - START)) | env.txt |"

# What can run here (one interpreter start): CUDA, and the peers LIGER, DS (DeepSpeed), TORCH_LCE (torch's
# chunked loss).
CUDA=0 LIGER=0 DS=0 TORCH_LCE=0
eval "$(timeout 90 "$PY" - 2>/dev/null <<'EOF'
import importlib
def ok(module, attr=None):
    try:
        m = importlib.import_module(module)
        return int(attr is None or hasattr(m, attr))
    except Exception:
        return 0
import torch
print(f"CUDA={int(torch.cuda.is_available())}",
      f"LIGER={ok('liger_kernel.transformers.tiled_mlp') & ok('liger_kernel.transformers.fused_linear_cross_entropy')}",
      f"DS={ok('deepspeed.runtime.sequence_parallel.ulysses_sp')}",
      f"TORCH_LCE={ok('torch.nn.functional', 'linear_cross_entropy')}")
EOF
)"
echo "cuda=$CUDA; peers: liger=$LIGER deepspeed=$DS torch_linear_cross_entropy=$TORCH_LCE" | tee -a "$RESULTS/env.txt"

# --- 1. the tests that matter on CUDA ------------------------------------------------------------------------
part tests 180 test_cuda.txt "$PY" -m pytest -q -p no:cacheprovider -rA --durations=10 tests/test_cuda.py

if ((!CUDA)); then  # the tests above said why they skipped; the benchmarks would only crash
    for name in mlp loss step; do
        say "| $name | skipped: torch.cuda.is_available() is False | 0 | - |"
    done
    FAILED+=(no-cuda)
else

# --- 2. MLP and loss benchmarks at 32K tokens, bf16, against untiled -----------------------------------------
mlp_impls=untiled,fxtile
((DS)) && mlp_impls+=,deepspeed
((LIGER)) && mlp_impls+=,liger
MLP=(benchmarks/mlp.py --device cuda --dtype bf16 --seq 32768 --hidden 4096 --inter 14336 --rounds "$ROUNDS" --repeats 3)
if ! part mlp 75 mlp.txt "$PY" "${MLP[@]}" --impls "$mlp_impls" && [[ $mlp_impls != untiled,fxtile ]] && (($(left) > 60)); then
    mv "$RESULTS/mlp.txt" "$RESULTS/mlp-peers-failed.txt"
    part mlp-untiled-fxtile 60 mlp.txt "$PY" "${MLP[@]}" --impls untiled,fxtile --rounds 1 &&
        cat "$RESULTS/mlp-peers-failed.txt" >>"$RESULTS/mlp.txt" && rm -f "$RESULTS/mlp-peers-failed.txt"
fi
((LIGER)) || echo "(Liger-Kernel not available: no liger row)" >>"$RESULTS/mlp.txt"

loss_impls=untiled,fxtile
((TORCH_LCE)) && loss_impls+=,torch
((DS)) && loss_impls+=,deepspeed
((LIGER)) && loss_impls+=,liger
LOSS=(benchmarks/loss.py --device cuda --dtype bf16 --seq 32768 --hidden 4096 --vocab 128256 --rounds "$ROUNDS" --repeats 3)
if ! part loss 90 loss.txt "$PY" "${LOSS[@]}" --impls "$loss_impls" && [[ $loss_impls != untiled,fxtile ]] && (($(left) > 60)); then
    mv "$RESULTS/loss.txt" "$RESULTS/loss-peers-failed.txt"
    part loss-untiled-fxtile 60 loss.txt "$PY" "${LOSS[@]}" --impls untiled,fxtile --rounds 1 &&
        cat "$RESULTS/loss-peers-failed.txt" >>"$RESULTS/loss.txt" && rm -f "$RESULTS/loss-peers-failed.txt"
fi
((LIGER)) || echo "(Liger-Kernel not available: no liger row)" >>"$RESULTS/loss.txt"

# --- 3. whole training steps ----------------------------------------------------------------------------------
if [[ -f benchmarks/step.py ]]; then
    STEP=(benchmarks/step.py --device cuda --dtype bf16 --seq 8192 16384 32768)
    # without DeepSpeed its rows could only crash: leave them out where step.py takes --impls
    if ((!DS)) && grep -q -- '"--impls"' benchmarks/step.py; then
        step_impls=$(timeout 30 "$PY" - 2>/dev/null <<'EOF'
import ast
for line in open("benchmarks/step.py"):
    if line.startswith("IMPLS = "):
        print(",".join(i for i in ast.literal_eval(line.split("=", 1)[1].strip()) if i != "deepspeed"))
        break
EOF
)
        [[ -n $step_impls ]] && STEP+=(--impls "$step_impls")
    fi
    part step 170 step.txt "$PY" "${STEP[@]}"
else
    echo "benchmarks/step.py is absent in this tree: no step table" >"$RESULTS/step.txt"
    say "| step | skipped: benchmarks/step.py absent | 0 | step.txt |"
fi

# --- 4. bf16 weight-gradient sums against fp64 ----------------------------------------------------------------
part accumulate 45 accumulate.txt "$PY" benchmarks/accumulate.py --device cuda --hidden 4096 --inter 14336 --tokens 8192

fi  # CUDA

# --- the end: what to read first -------------------------------------------------------------------------------
say ""
say "total $(($(date +%s) - START)) s of a ${BUDGET} s budget; ${#FAILED[@]} part(s) not ok${FAILED[*]:+: ${FAILED[*]}}"
for f in test_cuda.txt mlp.txt loss.txt step.txt accumulate.txt; do
    [[ -f $RESULTS/$f ]] || continue
    echo
    echo "===== $f (end)"
    if [[ $f == test_cuda.txt ]]; then
        grep -E '^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed|error' "$RESULTS/$f" | tail -60
    else
        tail -25 "$RESULTS/$f"
    fi
done
echo
cat "$SUMMARY"
((${#FAILED[@]} == 0))
