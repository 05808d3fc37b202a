#!/usr/bin/env bash
# `make smoke`: the real compose stack end to end, where a Docker engine exists.
# Builds and starts the stack under its own project name and port, scales to 5 consumers,
# posts orders, checks each completes, then removes the stack and its volumes.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! docker info >/dev/null 2>&1; then
  echo "smoke: no Docker engine on this machine; skipped (make test does not depend on it)"
  exit 0
fi

# Ports of its own, none of RabbitMQ's (5672, 15672, 25672: any local node holds them).
export COMPOSE_PROJECT_NAME=orders-smoke PRODUCER_PORT=${SMOKE_PORT:-18000} RABBITMQ_MANAGEMENT_PORT=${SMOKE_MGMT_PORT:-18672}
compose() { docker compose -p "$COMPOSE_PROJECT_NAME" "$@"; }
trap 'compose down -v --remove-orphans >/dev/null 2>&1 || true' EXIT

compose up -d --build --wait
compose up -d --wait --scale consumer=5

# No secret or guest credential in the images' environment.
for image in $(compose config --images); do
  if docker image inspect "$image" --format '{{json .Config.Env}}' | grep -Eiq 'password|secret|api_keys=|guest'; then
    echo "smoke: $image carries a credential in its environment"; exit 1
  fi
done
key=$(cut -d: -f2- secrets/api-keys | cut -d, -f1)
auth=(-H "X-API-Key: $key")
[ "$(curl -s -o /dev/null -w '%{http_code}' -X POST "http://127.0.0.1:${PRODUCER_PORT}/orders")" = 401 ] \
  || { echo "smoke: POST /orders without a key was not refused"; exit 1; }
running=$(compose ps -q consumer | wc -l)
[ "$running" -eq 5 ] || { echo "smoke: expected 5 consumers, found $running"; exit 1; }

base="http://127.0.0.1:${PRODUCER_PORT}"
ids=()
for i in $(seq 50); do
  ids+=("$(curl -fsS "${auth[@]}" -X POST "$base/orders" -H 'content-type: application/json' \
    -d "{\"customer_id\":\"smoke-$i\",\"items\":[{\"sku\":\"PEN-1\",\"quantity\":1}],\"priority\":$((i % 10))}" \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["id"])')")
done

deadline=$((SECONDS + 120))
for id in "${ids[@]}"; do
  until [ "$(curl -fsS "${auth[@]}" "$base/orders/$id" | python3 -c 'import json, sys; print(json.load(sys.stdin)["status"])')" = completed ]; do
    [ $SECONDS -lt $deadline ] || { echo "smoke: order $id did not complete"; compose logs --tail 50; exit 1; }
    sleep 0.5
  done
done
workers=$(docker compose -p "$COMPOSE_PROJECT_NAME" exec -T postgres \
  psql -U orders -d orders -tAc \
  "SELECT count(DISTINCT processed_by) FROM orders WHERE customer_id LIKE 'smoke-%'")
echo "smoke: ${#ids[@]} orders completed, processed by $workers of 5 consumers"
[ "$workers" -eq 5 ] || { echo "smoke: the work was not shared by all 5 consumers"; exit 1; }
