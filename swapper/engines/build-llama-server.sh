#!/usr/bin/env bash
# Build llama.cpp's llama-server from the sources vendored in the llama-cpp-python sdist.
#
# Usage: build-llama-server.sh VERSION VARIANT DEST_DIR [JOBS]
#   VERSION  llama-cpp-python version whose vendored llama.cpp is built (e.g. 0.3.36)
#   VARIANT  cpu | cuda | hip
#   DEST_DIR receives bin/llama-server (statically linked against llama/ggml)
#
# Used by `swapper install-engine` and by the container images, so that every llama-server
# swapper runs comes from one recipe. Environment: CMAKE_CUDA_ARCHITECTURES, AMDGPU_TARGETS,
# LLAMA_SDIST (a local sdist to use instead of downloading one), EXTRA_CMAKE_ARGS.
set -euo pipefail

version=${1:?version}
variant=${2:?variant}
dest=${3:?dest dir}
jobs=${4:-$(nproc)}

case "$variant" in
  cpu)  flags=() ;;
  cuda) flags=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=${CMAKE_CUDA_ARCHITECTURES:-75;80;86;89;90}") ;;
  hip)  flags=(-DGGML_HIP=ON "-DAMDGPU_TARGETS=${AMDGPU_TARGETS:-gfx90a;gfx942;gfx1100}") ;;
  *) echo "unknown variant '$variant' (cpu, cuda, hip)" >&2; exit 2 ;;
esac

work=$(mktemp -d "${TMPDIR:-/tmp}/llama-build.XXXXXX")
trap 'rm -rf "$work"' EXIT

sdist=${LLAMA_SDIST:-}
if [ -z "$sdist" ]; then
  # --no-binary names the one package: with :all: pip would also build, from source, every build
  # tool it installs to read the sdist's metadata (scikit-build-core, ninja, ...), which takes
  # ~25 minutes where no ninja is installed; the sdist itself downloads in seconds.
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==${version}" -d "$work/dl"
  sdist=$(ls "$work"/dl/llama_cpp_python-*.tar.gz)
fi
tar -xzf "$sdist" -C "$work"
src=$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp)

# LLAMA_USE_PREBUILT_UI=OFF: otherwise the build tries to download the web UI.
cmake -S "$src" -B "$work/build" \
  -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
  -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_CURL=OFF \
  -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release \
  "${flags[@]}" ${EXTRA_CMAKE_ARGS:-}
cmake --build "$work/build" --target llama-server -j"$jobs"

# Install atomically: a half-copied binary must never be found by a concurrent lookup.
mkdir -p "$dest/bin"
cp "$work/build/bin/llama-server" "$dest/bin/llama-server.tmp.$$"
mv "$dest/bin/llama-server.tmp.$$" "$dest/bin/llama-server"
"$dest/bin/llama-server" --version >"$dest/VERSION" 2>&1 || true
echo "built $dest/bin/llama-server"
