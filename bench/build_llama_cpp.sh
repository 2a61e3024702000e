#!/usr/bin/env bash
# Builds llama.cpp once, as the peer runtime our GGUF exports and benchmarks are checked against.
#
# The source is the llama.cpp vendored in llama-cpp-python's sdist: PyPI is reachable from our machines,
# GitHub is not. Only the tools we call are built (CPU, -march=native), statically linked so the binaries
# can be moved, and installed into a cache folder keyed by the llama-cpp-python version:
#   ${LLMDROP_RT_CACHE:-${XDG_CACHE_HOME:-~/.cache}/llmdrop_rt}/llama.cpp/<version>/bin
# A stamp file there marks a finished build; when it exists, this does nothing.
#
# Usage: bench/build_llama_cpp.sh            (LLAMA_CPP_PYTHON_VERSION and JOBS override the defaults)
set -euo pipefail

VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python3}"
TARGETS=(llama-bench llama-completion llama-perplexity llama-quantize llama-simple)

# Same resolution as llmdrop_rt.gguf_import._cache_dir, so Python finds what this installs.
if [[ -n "${LLMDROP_RT_CACHE:-}" ]]; then
    CACHE="$LLMDROP_RT_CACHE"
elif [[ -n "${XDG_CACHE_HOME:-}" ]]; then
    CACHE="$XDG_CACHE_HOME/llmdrop_rt"
else
    CACHE="$HOME/.cache/llmdrop_rt"
fi
PREFIX="$CACHE/llama.cpp/$VERSION"
STAMP="$PREFIX/BUILT"

log() { echo "[build_llama_cpp $(date +%H:%M:%S)] $*"; }

if [[ -f "$STAMP" ]]; then
    log "already built: $PREFIX/bin ($(tr '\n' ' ' < "$STAMP"))"
    exit 0
fi

missing=()
for tool in cmake g++ make; do
    command -v "$tool" >/dev/null || missing+=("$tool")
done
if (( ${#missing[@]} )); then
    log "missing ${missing[*]}: installing cmake and build-essential with apt-get"
    apt-get update -q
    apt-get install -y -q cmake build-essential
fi

mkdir -p "$CACHE/llama.cpp"
# The work folder sits next to the destination so the final rename stays on one filesystem (atomic).
WORK="$(mktemp -d "$CACHE/llama.cpp/.build-$VERSION.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

log "downloading the llama-cpp-python==$VERSION sdist"
"$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$WORK/dl"
log "extracting"
tar -xzf "$WORK"/dl/llama_cpp_python-*.tar.gz -C "$WORK"
SRC="$(echo "$WORK"/llama_cpp_python-*/vendor/llama.cpp)"
# The sdist carries the submodule's git metadata; the commit goes into the stamp and the binaries' build info.
COMMIT="$(git -C "$SRC" rev-parse --short HEAD 2>/dev/null || echo unknown)"

# LLAMA_CURL is deprecated in this llama.cpp (it only warns), so it is not passed; downloads need OpenSSL
# instead, which we turn off: models come from local files. Static libraries keep the binaries self-contained.
log "configuring llama.cpp $COMMIT (GGML_NATIVE=ON, Release, static, no OpenSSL, no server)"
cmake -S "$SRC" -B "$WORK/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF \
    > "$WORK/configure.log" || { cat "$WORK/configure.log"; exit 1; }

started=$SECONDS
for target in "${TARGETS[@]}"; do
    log "building $target (-j$JOBS)"
    cmake --build "$WORK/build" --target "$target" -j"$JOBS" > "$WORK/build-$target.log" \
        || { tail -50 "$WORK/build-$target.log"; exit 1; }
done
log "compiled in $(( SECONDS - started )) s"

mkdir -p "$WORK/out/bin"
for target in "${TARGETS[@]}"; do
    cp "$WORK/build/bin/$target" "$WORK/out/bin/"
done
{
    echo "llama-cpp-python=$VERSION"
    echo "llama.cpp=$COMMIT"
    echo "compile_seconds=$(( SECONDS - started ))"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} > "$WORK/out/BUILT"

rm -rf "$PREFIX"  # a leftover without a stamp is an interrupted install; the stamp is what counts
mv "$WORK/out" "$PREFIX"
log "installed into $PREFIX/bin: ${TARGETS[*]}"
