#!/usr/bin/env bash
# A PostgreSQL that fails over, beside the machine's own: PostgreSQL 17, Patroni 4 and etcd 3.5
# from the Debian 13 root that scripts/rabbitmq4.sh builds (Debian 12 has Patroni 3.0 and no
# PostgreSQL 17). What the fault suite's PostgresCluster (tests/faults/nodes.py) runs.
#
#   scripts/postgres-ha.sh root                 install them into the root once (no cluster made)
#   scripts/postgres-ha.sh etcd ARGS...         etcd ARGS in the root, as the etcd user
#   scripts/postgres-ha.sh patroni CONFIG       patroni CONFIG in the root, as postgres (foreground)
#   scripts/postgres-ha.sh patronictl ARGS...   patronictl ARGS in the root, as postgres
#
# Files a member writes (data, configuration) live under $RABBITMQ4_NODES, which means the same
# path inside the root and out.
set -euo pipefail

HERE=$(dirname "$0")
ROOT=${RABBITMQ4_ROOT:-/var/cache/orders/trixie}

root() {
  "$HERE/rabbitmq4.sh" root >/dev/null
  if [ ! -x "$ROOT/usr/bin/patroni" ] || [ ! -d "$ROOT/usr/lib/python3/dist-packages/etcd" ] \
    || [ ! -x "$ROOT/usr/lib/postgresql/17/bin/postgres" ] \
    || [ ! -x "$ROOT/usr/bin/etcd" ]; then
    mkdir -p "$ROOT/etc/postgresql-common"
    echo "create_main_cluster = false" > "$ROOT/etc/postgresql-common/createcluster.conf"
    printf '#!/bin/sh\nexit 101\n' > "$ROOT/usr/sbin/policy-rc.d" && chmod +x "$ROOT/usr/sbin/policy-rc.d"
    chroot "$ROOT" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive chroot "$ROOT" apt-get install -y -qq --no-install-recommends \
      postgresql-17 patroni python3-etcd etcd-server >&2  # python3-etcd: Patroni's etcd3 store needs it
  fi
  # Patroni's thread pools need POSIX semaphores; the root's /dev is a bind without /dev/shm
  mountpoint -q "$ROOT/dev/shm" || mount -t tmpfs -o mode=1777 shm "$ROOT/dev/shm"
  echo "$ROOT"
}

as() {
  local user=$1
  shift
  HOME=/tmp exec chroot --userspec="$(chroot "$ROOT" id -u "$user"):$(chroot "$ROOT" id -g "$user")" \
    "$ROOT" "$@"
}

etcd() { as etcd /usr/bin/etcd "$@"; }
patroni() { as postgres /usr/bin/patroni "$1"; }
patronictl() { as postgres /usr/bin/patronictl "$@"; }

command=${1:?"usage: $0 root | etcd ARGS... | patroni CONFIG | patronictl ARGS..."}
shift
"$command" "$@"
