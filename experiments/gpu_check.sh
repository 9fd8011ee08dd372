#!/usr/bin/env bash
# The GPU check in one call: versions, the core tests, then the bench, on the lent GPU machine
# (jax 0.11.2 + CUDA 13 plugin, Python 3.12, nothing installable; lorax runs from the checkout).
#
#   OUT=/some/folder bash experiments/gpu_check.sh      # from the repository root
#
# Writes $OUT/versions.txt, $OUT/tests.log, $OUT/bench.log, the bench's files under $OUT/bench,
# and $OUT/status.txt (one "part rc=N seconds=S" line each). A failing or timed-out test part is
# recorded and the bench still runs; the exit status is 0 only if every part passed.
#
# The whole call stays under TOTAL_S (default 570 s; the device's per-call limit is 600 s): the
# tests get TESTS_TIMEOUT_S (default 200, all groups together), the bench what is left (or
# BENCH_TIMEOUT_S if smaller). Other knobs (environment): PYTHON (python3), TESTS=0 / BENCH=0 to
# skip a part, TEST_FILTER (a pytest -k expression ANDed with the default one) and BENCH_EXTRA
# (more bench flags). A tiny local run on CPU:
#   OUT=/tmp/gpuout TEST_FILTER=scan BENCH_EXTRA="--quick --no-rss" bash experiments/gpu_check.sh
#
# pytest and tqdm may be missing on the image: `bash experiments/gpu_check.sh --prepare-deps`
# (here, with network) puts pure-Python wheels of both into .gpu_deps (git-ignored; ~10 MB);
# pass `carry: [".gpu_deps"]` to the device run. They come last on PYTHONPATH, so the image's
# own packages win. Without tqdm anywhere, a stand-in progress bar prints the bench's labels.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}

if [ "${1:-}" = "--prepare-deps" ]; then
  rm -rf .gpu_deps
  # Pure-Python wheels for the GPU image's Python 3.12 (no dependencies resolved: listed here).
  "$PY" -m pip install -q --target .gpu_deps --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation py --no-compile \
    "pytest>=8" pluggy iniconfig packaging pygments tqdm
  du -sh .gpu_deps
  exit $?
fi

: "${OUT:?set OUT to the output folder}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONUNBUFFERED=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -d "$ROOT/.gpu_deps" ]; then
  export PYTHONPATH="$PYTHONPATH:$ROOT/.gpu_deps"
fi
if ! "$PY" -c "import tqdm" 2>/dev/null; then  # the bench imports tqdm: a stand-in printing its labels
  STUB=$(mktemp -d)
  cat > "$STUB/tqdm.py" <<'PY'
"""Stand-in for tqdm (not installed): the bench's progress labels, one line each, on stderr."""
import sys


class tqdm:
    def __init__(self, iterable=None, total=None, desc=None, file=None, **_):
        self.iterable, self.n, self.file = iterable, 0, file or sys.stderr

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __iter__(self):
        yield from self.iterable

    def update(self, n=1):
        self.n += n

    def set_description(self, desc=None, refresh=True):
        print(f"[{self.n}] {desc}", file=self.file, flush=True)

    def close(self):
        pass
PY
  export PYTHONPATH="$PYTHONPATH:$STUB"
fi
# One process holds the GPU at a time, but the bench's --rss workers are child processes: no
# preallocation (75% of the GPU per process by default), so a child can start next to its parent.
export XLA_PYTHON_CLIENT_PREALLOCATE=false

TOTAL_S=${TOTAL_S:-570}
STATUS="$OUT/status.txt"
: > "$STATUS"
record() {  # part rc start_seconds
  echo "$1 rc=$2 seconds=$((SECONDS - $3))" | tee -a "$STATUS"
}

# ------------------------------------------------------------------------------------- versions
start=$SECONDS
"$PY" - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import platform, sys
from importlib import metadata

print("python", platform.python_version(), sys.executable)
for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "jax-cuda12-plugin",
             "jax-cuda12-pjrt", "flax", "optax", "orbax-checkpoint", "chex", "numpy",
             "ml_dtypes", "pytest", "tqdm"):
    try:
        print(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        print(f"{name} (not installed)")
import jax

print("jax.__version__", jax.__version__, "backend", jax.default_backend())
for d in jax.devices():
    print("device", d.id, d.platform, getattr(d, "device_kind", "?"))
import lorax
from lorax import compat

print("lorax", lorax.__file__)
print("compat: JAX_VERSION", compat.JAX_VERSION, "tested", compat.OLDEST_JAX, "..",
      compat.NEWEST_JAX, "known up to", compat.NEWEST_KNOWN_JAX)
try:
    from flax import nnx  # noqa: F401  (flax 0.12.8 needs jax.experimental.hijax.MutableHiType)
    print("flax.nnx imports")
except Exception as err:  # reported, not fatal: the linen tests still run
    print("flax.nnx does NOT import:", type(err).__name__, err)
PY
record versions $? "$start"
command -v nvidia-smi >/dev/null && nvidia-smi -L 2>&1 | tee -a "$OUT/versions.txt"

# ---------------------------------------------------------------------------------------- tests
# .ci/oldest's core subset, without what forces CPU devices in subprocesses (test_distributed,
# the 8-device sharding/checkpoint children) or kills a child mid-save. f32 matmuls at full
# precision: the tests' tolerances are float32-eps relative, and on this GPU the default
# precision of f32 dots is TF32.
if [ "${TESTS:-1}" != 0 ]; then
  start=$SECONDS
  export JAX_DEFAULT_MATMUL_PRECISION=highest
  filter="not on_8_devices and not on_8_cpu_devices and not sigkill and not bytes_near and not beats_the"
  [ -n "${TEST_FILTER:-}" ] && filter="($filter) and ($TEST_FILTER)"
  # Groups, most telling first, with their weights: a group's timeout is its weight's share of
  # what is left of the test budget (time a group does not use passes on to the next ones).
  groups=(
    "tests/test_compat.py lorax/compat.py lorax/interpreter.py lorax/infer.py"
    "tests/test_wrap.py tests/test_lora_transform.py tests/test_value_and_grad.py tests/test_traps.py tests/test_config.py lorax/config.py lorax/partition.py"
    "tests/test_layouts.py tests/test_conformance.py tests/test_layout_interop.py tests/test_lowering.py lorax/layouts.py lorax/lowrank.py"
    "tests/test_optimizer_merge.py tests/test_checkpoint.py tests/test_peft.py tests/test_sharding.py lorax/checkpoint.py"
  )
  weights=(2 4 3 2)
  budget=${TESTS_TIMEOUT_S:-200}
  : > "$OUT/tests.log"
  for i in "${!groups[@]}"; do
    left=$((budget - (SECONDS - start)))
    rest=0
    for w in "${weights[@]:i}"; do rest=$((rest + w)); done
    share=$((left * weights[i] / rest))
    start_group=$SECONDS
    if [ "$share" -lt 10 ]; then
      echo "tests[$i]: skipped, the test budget is spent" | tee -a "$OUT/tests.log"
      record "tests[$i]" 124 "$start_group"
      continue
    fi
    echo "=== tests[$i] (timeout ${share}s): ${groups[$i]}" | tee -a "$OUT/tests.log"
    # shellcheck disable=SC2086  # the group is a word list
    timeout -k 10 "$share" "$PY" -m pytest -q -x -p no:cacheprovider --durations=5 \
      -k "$filter" ${groups[$i]} 2>&1 | tee -a "$OUT/tests.log"
    rc=$?
    echo | tee -a "$OUT/tests.log"  # a timed-out pytest leaves its line of dots open
    [ "$rc" = 5 ] && rc=0  # nothing collected after the -k filter
    record "tests[$i]" "$rc" "$start_group"
  done
  unset JAX_DEFAULT_MATMUL_PRECISION
fi

# ---------------------------------------------------------------------------------------- bench
if [ "${BENCH:-1}" != 0 ]; then
  : > "$OUT/bench.log"
  # The bench GPT at its own batch (8 x 128 tokens), then a batch that fills a GPU better; the
  # second gets what time is left. bench.md and bench.json of each come back (8 files in all).
  for batch in ${BENCH_BATCHES:-8 64}; do
    start=$SECONDS
    BENCH_ARGS=(--models gpt --dtypes float32 bfloat16 --no-rss --no-extras --steps 20
                --batch "$batch" --out "$OUT/bench_b$batch")
    # shellcheck disable=SC2206  # BENCH_EXTRA is a word list, e.g. "--quick --no-rss"
    BENCH_ARGS+=(${BENCH_EXTRA:-})
    echo "=== bench: ${BENCH_ARGS[*]}" | tee -a "$OUT/bench.log"
    bench_s=$((TOTAL_S - SECONDS - 15))  # what the whole call has left, less a margin
    [ -n "${BENCH_TIMEOUT_S:-}" ] && [ "$BENCH_TIMEOUT_S" -lt "$bench_s" ] && bench_s=$BENCH_TIMEOUT_S
    if [ "$bench_s" -lt 20 ]; then
      echo "bench batch $batch: skipped, no time left" | tee -a "$OUT/bench.log"
      continue
    fi
    echo "bench timeout ${bench_s}s" | tee -a "$OUT/bench.log"
    timeout -k 10 "$bench_s" "$PY" -m experiments.bench "${BENCH_ARGS[@]}" 2>&1 \
      | tee -a "$OUT/bench.log"
    record "bench[b$batch]" $? "$start"
    rm -f "$OUT/bench_b$batch/bench_scale.json"
  done
fi

echo "=== status"
cat "$STATUS"
! grep -qv " rc=0 " "$STATUS"
