#!/usr/bin/env bash
# A Docker engine of the project's own, for the deploy test (tests/deploy/test_stack.py): Debian's
# docker.io (dockerd 20.10) in a network namespace, so the stack's ports (5672, 5432, 8000, ...)
# never meet the machine's own broker and database, and base images built here from Debian
# packages, since no image registry is reachable.
#
#   scripts/docker-engine.sh start     install docker.io if missing, start dockerd in the namespace
#   scripts/docker-engine.sh images    build the stand-in base images (cached roots, see below)
#   scripts/docker-engine.sh stop      stop dockerd and the proxy, remove the namespace
#
# The namespace ($NETNS) is linked to the host by a veth pair ($HOST_IP here, $NS_IP there) and
# routes out through it, but the host forwards nothing: builds reach PyPI and Debian's archive
# through scripts/registry_proxy.py on $HOST_IP:$PROXY_PORT (the HTTPS_PROXY and http_proxy build
# arguments), and published
# ports are reached at $NS_IP. dockerd keeps its data, state and socket ($SOCK) to itself.
set -euo pipefail
cd "$(dirname "$0")/.."

NETNS=${ENGINE_NETNS:-orders-engine}
HOST_IP=10.231.0.1
NS_IP=10.231.0.2
PROXY_PORT=3128
STATE=${ENGINE_STATE:-/var/lib/orders-engine}
RUN=/run/$NETNS
SOCK=$RUN/docker.sock
CACHE=${ENGINE_CACHE:-/var/cache/orders/images}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
export DOCKER_HOST=unix://$SOCK

in_ns() { nsenter --net="/run/netns/$NETNS" "$@"; }

install() {
  command -v dockerd >/dev/null && return
  # No service may start on its own: the engine runs only in the namespace below.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  (apt-get update -qq || true)
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
  rm -f /usr/sbin/policy-rc.d
}

network() {
  [ -e "/run/netns/$NETNS" ] && return
  ip netns add "$NETNS"
  ip link add "$NETNS-h" type veth peer name "$NETNS-n"
  ip link set "$NETNS-n" netns "$NETNS"
  ip addr add "$HOST_IP/30" dev "$NETNS-h" && ip link set "$NETNS-h" up
  in_ns ip addr add "$NS_IP/30" dev "$NETNS-n"
  in_ns ip link set "$NETNS-n" up
  in_ns ip link set lo up
  in_ns ip route add default via "$HOST_IP"
}

start() {
  install
  network
  mkdir -p "$STATE" "$RUN"
  if ! docker version >/dev/null 2>&1; then
    # `ip netns exec` would remount /sys and lose the devices cgroup; nsenter keeps it.
    in_ns dockerd --data-root "$STATE" --exec-root "$RUN/exec" --pidfile "$RUN/dockerd.pid" \
      --host "$DOCKER_HOST" >"$RUN/dockerd.log" 2>&1 &
    for _ in $(seq 60); do docker version >/dev/null 2>&1 && break; sleep 1; done
    docker version --format 'dockerd {{.Server.Version}}' || { tail -20 "$RUN/dockerd.log"; exit 1; }
  fi
  if ! [ -e "$RUN/proxy.pid" ] || ! kill -0 "$(cat "$RUN/proxy.pid")" 2>/dev/null; then
    python3 scripts/registry_proxy.py "$HOST_IP" "$PROXY_PORT" >"$RUN/proxy.log" 2>&1 &
    echo $! > "$RUN/proxy.pid"
  fi
}

stop() {
  for pid in "$RUN/proxy.pid" "$RUN/dockerd.pid"; do
    [ -e "$pid" ] && kill "$(cat "$pid")" 2>/dev/null || true
  done
  for _ in $(seq 30); do [ -e "$RUN/dockerd.pid" ] && sleep 1 || break; done
  ip link del "$NETNS-h" 2>/dev/null || true
  ip netns del "$NETNS" 2>/dev/null || true
}

# A Debian root built once and kept (debootstrap), imported as an image.
base() {
  local name=$1 suite=$2 packages=$3
  docker image inspect "$name" >/dev/null 2>&1 && return
  if [ ! -e "$CACHE/$suite/.complete" ]; then
    command -v debootstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap
    rm -rf "$CACHE/$suite" && mkdir -p "$CACHE/$suite"
    debootstrap --variant=minbase --include="$packages" "$suite" "$CACHE/$suite" "$MIRROR" >&2
    rm -rf "$CACHE/$suite"/var/cache/apt/archives/*.deb "$CACHE/$suite"/var/lib/apt/lists/*
    touch "$CACHE/$suite/.complete"
  fi
  tar -C "$CACHE/$suite" --exclude=./.complete -c . | docker import - "$name" >/dev/null
}

images() {
  base orders-local/bookworm:base bookworm python3
  base orders-local/trixie:base trixie rabbitmq-server,postgresql-17
  local dir=tests/deploy/images
  mkdir -p "$RUN/python" "$RUN/uv" "$RUN/postgres"
  # The images that reach PyPI trust the CAs the machine trusts (see images/python/Dockerfile).
  cp "$dir/python/Dockerfile" "$RUN/python/"
  cp "$dir/postgres/"* "$RUN/postgres/"
  for image in python postgres; do
    cp "${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}" "$RUN/$image/machine-ca.crt"
  done
  docker build -q -t orders-local/python:3.11 "$RUN/python" >/dev/null
  cp "$(command -v uv || echo .tools/bin/uv)" "$RUN/uv/uv"
  docker build -q -t orders-local/uv:local -f "$dir/uv/Dockerfile" "$RUN/uv" >/dev/null
  docker build -q -t orders-local/rabbitmq:4.0 "$dir/rabbitmq" >/dev/null
  docker build -q -t orders-local/postgres:17 "$RUN/postgres" >/dev/null
  docker build -q -t orders-local/etcd:3.5 --build-arg "http_proxy=http://$HOST_IP:$PROXY_PORT" \
    "$dir/etcd" >/dev/null
  docker images --format '{{.Repository}}:{{.Tag}} {{.Size}}' 'orders-local/*'
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  images) images ;;
  *) echo "usage: $0 start|images|stop" >&2; exit 2 ;;
esac
