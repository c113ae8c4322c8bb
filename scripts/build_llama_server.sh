#!/usr/bin/env bash
# Build llama.cpp's C++ server (llama-server) for the CPU and link it into a venv's bin/.
#
# Usage: scripts/build_llama_server.sh VERSION VENV
#
# The source is the llama.cpp vendored in PyPI's source package of llama-cpp-python
# VERSION (the bindings the Makefile builds from the same package), so both servers the
# tests watch run the same llama.cpp. CPU only: no GPU backends, no web UI download, no
# curl or OpenSSL; only the llama-server target (its shared libraries beside it in bin/,
# found through an $ORIGIN rpath). Built once per machine into a cache outside the
# checkout, as pip keeps its wheels: ${XDG_CACHE_HOME:-~/.cache}/latencyprism/. About
# 7 minutes on 2 cores the first time; a fresh clone's `make` then only links it.
set -euo pipefail

version=${1:?usage: $0 VERSION VENV}
venv=${2:?usage: $0 VERSION VENV}
cache="${XDG_CACHE_HOME:-$HOME/.cache}/latencyprism"
dest="$cache/llama-server-$version"
bin="$dest/bin/llama-server"

if ! "$bin" --version >/dev/null 2>&1; then
    work=$(mktemp -d "$cache/.llama-server-build.XXXXXX" 2>/dev/null || {
        mkdir -p "$cache" && mktemp -d "$cache/.llama-server-build.XXXXXX"; })
    trap 'rm -rf "$work"' EXIT
    echo "building llama-server $version for the CPU (once per machine, ~7 min on 2 cores)"
    "$venv/bin/python" -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$version" -d "$work/src" 2>&1 | grep -v "^WARNING: Location" || true
    tar xzf "$work/src/llama_cpp_python-$version.tar.gz" -C "$work/src"
    cmake -S "$work/src/llama_cpp_python-$version/vendor/llama.cpp" -B "$work/build" \
        -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON \
        -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON '-DCMAKE_INSTALL_RPATH=$ORIGIN' \
        -DGGML_CUDA=OFF -DGGML_VULKAN=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=ON \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_UI=OFF \
        -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_HTML=OFF -DLLAMA_OPENSSL=OFF \
        -DLLAMA_CURL=OFF >"$work/cmake.log" 2>&1 || { cat "$work/cmake.log"; exit 1; }
    cmake --build "$work/build" --target llama-server -j"$(nproc)" >"$work/build.log" 2>&1 \
        || { tail -40 "$work/build.log"; exit 1; }
    rm -rf "$dest"
    mkdir -p "$dest"
    mv "$work/build/bin" "$dest/bin"
    "$bin" --version >/dev/null 2>&1 || { echo "the llama-server built does not run"; exit 1; }
fi
ln -sf "$bin" "$venv/bin/llama-server"
