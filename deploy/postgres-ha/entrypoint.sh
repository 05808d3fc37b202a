#!/bin/sh
# The member's name and addresses are its hostname (the compose service's); its passwords are the
# compose secrets, handed to Patroni as the environment it reads (Patroni reads no *_FILE). Run
# before patronictl for what needs the REST API's login:
#   docker compose exec postgres patroni-entrypoint.sh patronictl switchover
set -eu
me=$(hostname)
export PATRONI_NAME="$me"
export PATRONI_RESTAPI_CONNECT_ADDRESS="$me:8008"
export PATRONI_POSTGRESQL_CONNECT_ADDRESS="$me:5432"
export PATRONI_SUPERUSER_USERNAME="${POSTGRES_USER:-postgres}"
export PATRONI_RESTAPI_USERNAME=patroni
PATRONI_SUPERUSER_PASSWORD=$(cat /run/secrets/postgres_password)
PATRONI_REPLICATION_PASSWORD=$(cat /run/secrets/replication_password)
PATRONI_RESTAPI_PASSWORD=$(cat /run/secrets/patroni_api_password)
export PATRONI_SUPERUSER_PASSWORD PATRONI_REPLICATION_PASSWORD PATRONI_RESTAPI_PASSWORD
exec "$@"
