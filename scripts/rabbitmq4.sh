#!/usr/bin/env bash
# RabbitMQ 4 beside the machine's own broker, from a Debian 13 root (RabbitMQ 4.0.5, Erlang 27):
# what .ci/run tests against, and what the fault suite starts its nodes from when RABBITMQ4_ROOT
# is set. Debian 12 has no RabbitMQ 4, and no image registry is reachable here.
#
#   scripts/rabbitmq4.sh root                build the root once (cached), mount what it needs
#   scripts/rabbitmq4.sh server              rabbitmq-server -detached in the root, as rabbitmq,
#                                            with the caller's RABBITMQ_* settings
#   scripts/rabbitmq4.sh ctl ARGS...         rabbitmqctl ARGS in the root
#   scripts/rabbitmq4.sh start NAME PORT     a node NAME@localhost on 127.0.0.1:PORT (data in
#                                            $RABBITMQ4_NODES/NAME, kept), guest allowed over TCP
#   scripts/rabbitmq4.sh join NAME SEED      node NAME joins node SEED's cluster
#   scripts/rabbitmq4.sh stop NAME           stop that node
#
# Nodes in the root use their own epmd (ERL_EPMD_PORT), apart from the host's Erlang 25 one, one
# scheduler with busy-waiting off (two cores, shared), and no deprecated feature that RabbitMQ 4.3
# refuses (`server` adds those lines to the node's rabbit.conf). Node directories live under
# $RABBITMQ4_NODES, mounted at the same path in the root, so
# a path means the same inside and out.
set -euo pipefail

ROOT=${RABBITMQ4_ROOT:-/var/cache/orders/trixie}
NODES=${RABBITMQ4_NODES:-$ROOT.nodes}
export ERL_EPMD_PORT=${RABBITMQ4_EPMD_PORT:-4370}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
ERL_ARGS="+S 1:1 +sbwt none +sbwtdcpu none +sbwtdio none"

mounted() { mountpoint -q "$ROOT/$1"; }

root() {
  if [ ! -x "$ROOT/usr/lib/rabbitmq/bin/rabbitmq-server" ]; then
    command -v debootstrap >/dev/null || { apt-get update -qq || true; apt-get install -y -qq debootstrap; }
    rm -rf "$ROOT.partial" && mkdir -p "$(dirname "$ROOT")"
    debootstrap --variant=minbase --include=rabbitmq-server trixie "$ROOT.partial" "$MIRROR" >&2
    rm -rf "$ROOT" && mv "$ROOT.partial" "$ROOT"
  fi
  mkdir -p "$NODES" "$ROOT$NODES"
  mounted proc || mount -t proc proc "$ROOT/proc"
  mounted dev || mount --bind /dev "$ROOT/dev"
  mounted sys || mount --bind /sys "$ROOT/sys"
  mounted "$NODES" || mount --bind "$NODES" "$ROOT$NODES"
  chmod 1777 "$NODES"
  echo "$ROOT"
}

# A command in the root as its rabbitmq user, with the caller's environment (RABBITMQ_* included).
in_root() {
  local user
  user=$(chroot "$ROOT" id -u rabbitmq):$(chroot "$ROOT" id -g rabbitmq)
  HOME=/var/lib/rabbitmq chroot --userspec="$user" "$ROOT" "$@"
}

server() {
  root >/dev/null
  local conf=${RABBITMQ_CONFIG_FILE:?set RABBITMQ_CONFIG_FILE} feature
  for feature in transient_nonexcl_queues global_qos; do  # refused already, as 4.3 will
    grep -q "permit.$feature" "$conf" || echo "deprecated_features.permit.$feature = false" >> "$conf"
  done
  chroot "$ROOT" chown -R rabbitmq:rabbitmq "$(dirname "$conf")"
  RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="${RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS:-} $ERL_ARGS" \
    in_root /usr/lib/rabbitmq/bin/rabbitmq-server -detached
}

ctl() { in_root /usr/lib/rabbitmq/bin/rabbitmqctl "$@"; }

start() {
  local name=$1 port=$2 dir
  root >/dev/null
  dir="$NODES/$name"
  mkdir -p "$dir/mnesia" "$dir/log"
  cat > "$dir/rabbit.conf" <<EOF
listeners.tcp.default = 127.0.0.1:$port
loopback_users = none
EOF
  echo '[].' > "$dir/plugins"
  if ctl -q -n "$name@localhost" status >/dev/null 2>&1; then
    echo "$name@localhost is already running" >&2
  else
    RABBITMQ_NODENAME="$name@localhost" RABBITMQ_NODE_PORT=$port RABBITMQ_DIST_PORT=$((port + 20000)) \
      RABBITMQ_MNESIA_BASE="$dir/mnesia" RABBITMQ_LOG_BASE="$dir/log" \
      RABBITMQ_CONFIG_FILE="$dir/rabbit.conf" RABBITMQ_ENABLED_PLUGINS_FILE="$dir/plugins" server
  fi
  for _ in $(seq 60); do
    ctl -q -n "$name@localhost" await_startup --timeout 10 >/dev/null 2>&1 && return 0
    sleep 2
  done
  ctl -q -n "$name@localhost" await_startup --timeout 10
}

stop() { ctl -q -n "$1@localhost" stop; }

# Node NAME joins SEED's cluster (nodes in the root share its rabbitmq user's Erlang cookie).
join() {
  local node="$1@localhost"
  ctl -q -n "$node" cluster_status | grep -q "$2@localhost" && return 0  # joined already
  ctl -q -n "$node" stop_app
  ctl -q -n "$node" join_cluster "$2@localhost"
  ctl -q -n "$node" start_app
}

command=${1:?"usage: $0 root | server | ctl ARGS... | start NAME PORT | join NAME SEED | stop NAME"}
shift
"$command" "$@"
