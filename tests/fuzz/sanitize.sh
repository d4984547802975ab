#!/usr/bin/env bash
# The compiled extensions built with AddressSanitizer and UBSan in a separate tree
# (build/asan/, the worktree's own .so files untouched), then the fuzz seeds, the saved
# findings and deterministic mutations of every seed run through all four targets, and the
# packet-path tests, against that build. Fails on any sanitizer report.
#
# CPython is not instrumented: the ASan runtime is preloaded, and leak checking is off
# (the interpreter's own allocations at exit are not ours to judge).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
OUT=$ROOT/build/asan
SRC=$OUT/src
MUTATIONS=${SANITIZE_MUTATIONS:-200}

mkdir -p "$SRC"
# The build requirements pinned in pyproject.toml (Cython), in the venv: setup.py runs here
# without pip's isolated build environment.
"$PY" -c 'import Cython' 2>/dev/null || "$PY" -m pip install -q $("$PY" -c 'import tomllib
print(" ".join(r for r in tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]
               if r.lower().startswith("cython")))')
# A copy of the sources (tar keeps mtimes, so an unchanged .pyx is not compiled again).
find "$SRC" -name '*.py' -path '*/kdns/*' -delete 2>/dev/null || true
mkdir -p "$SRC/kdns"
tar -C kdns --exclude '*.so' --exclude '*.c' --exclude __pycache__ -cf - . | tar -C "$SRC/kdns" -xpf -
cp setup.py pyproject.toml README.md "$SRC/"
SAN="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined -g"
(cd "$SRC" && CFLAGS="$SAN" LDFLAGS="$SAN" KDNS_DEBUG=1 \
    nice "$PY" setup.py -q build_ext --inplace --build-temp "$OUT/tmp" >"$OUT/build.log" 2>&1) \
    || { tail -30 "$OUT/build.log"; exit 1; }

export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:halt_on_error=1:strict_string_checks=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONPATH=$SRC
export KDNS_FUZZ_FINDINGS=$OUT/findings
(cd "$OUT" && "$PY" -c 'import kdns.packet._fastpath as f, kdns.zone._compile as c, sys
for m in (f, c):
    assert m.__file__.startswith(sys.argv[1]), f"{m.__name__} from {m.__file__}, not the sanitizer build"
print("sanitizer build:", f.__file__)' "$SRC")
LOG=$OUT/replay.log
set +e
"$PY" tests/fuzz/run.py replay --mutations "$MUTATIONS" 2>"$LOG"
rc=$?
grep -q "^engine: $SRC/" "$LOG" || { echo "sanitize: the replay did not use the sanitizer build"; rc=1; }
# asan_first imports kdns from the build here before conftest puts the worktree first.
KDNS_SANITIZER_SRC=$SRC PYTHONPATH=$SRC:$ROOT/tests/fuzz \
"$PY" -m pytest -q -p no:cacheprovider -p asan_first tests/test_fastpath.py tests/test_fwd_compiled.py \
    tests/test_udpserver.py tests/test_autopath.py 2>&1 | tail -3 | tee -a "$LOG"
rc2=${PIPESTATUS[0]}
set -e
if grep -q -E "ERROR: AddressSanitizer|runtime error:|SUMMARY: (Address|UndefinedBehavior)Sanitizer" "$LOG"; then
    grep -E -A30 "ERROR: AddressSanitizer|runtime error:" "$LOG" | head -60
    echo "sanitize: reports above (full log: $LOG)"
    exit 1
fi
[ $rc -eq 0 ] && [ $rc2 -eq 0 ] || { tail -20 "$LOG"; echo "sanitize: a target or test failed"; exit 1; }
echo "sanitize: no AddressSanitizer or UBSan report"
