# Everything a person runs. `make` alone lists the targets.
SHELL := bash
.DEFAULT_GOAL := help

# uv from PATH, or installed from PyPI into .tools on first use (a fresh machine needs only python3).
UV ?= $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
COMPOSE ?= docker compose
N ?= 5
CONSUMERS ?= 2
KIND ?= classic

.PHONY: help up secrets down logs ps scale dev smoke sync test faults bench bench-kinds bench-cluster bench-ha bench-peers lint fmt typecheck clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

# The Dockerfile's UV_IMAGE has the same version.
UV_VERSION := 0.13.9

.tools/bin/uv:
	python3 -m venv .tools
	.tools/bin/pip install --quiet uv==$(UV_VERSION)

# `up --wait` of Compose 2.22 (the version the project pins) exits 0 when a container cannot be
# created (a secret file missing) or turns unhealthy, as tests/deploy/test_stack.py found: so
# `up` and `scale` fail here when any container is left so.
started = ! $(COMPOSE) ps -a --format '{{if or (eq .State "created" "restarting" "dead") (eq .Health "unhealthy") (and (eq .State "exited") (ne .ExitCode 0))}}{{.Name}} did not start: {{.Status}}{{end}}' | grep .

up: secrets ## Build and run the stack (RabbitMQ, PostgreSQL, producer on :8000, relay, consumer)
	$(COMPOSE) up -d --build --wait
	@$(started)

secrets: $(UV) ## Make the local secrets under secrets/ that are missing (make up does)
	$(UV) run python scripts/make_secrets.py

down: ## Stop the stack (data volumes are kept)
	$(COMPOSE) down

logs: ## Follow the stack's logs
	$(COMPOSE) logs -f

ps: ## Show the stack's containers
	$(COMPOSE) ps

scale: ## Run N consumers: make scale N=5
	$(COMPOSE) up -d --wait --scale consumer=$(N)
	@$(started)

dev: sync ## Run the stack as local processes: make dev CONSUMERS=5 (no Docker needed)
	CONSUMERS=$(CONSUMERS) $(UV) run python scripts/dev.py

smoke: secrets ## Where a Docker engine exists: up, scale to 5 consumers, post orders, check, tear down
	bash scripts/smoke.sh

sync: $(UV) ## Install the workspace and dev tools into .venv
	$(UV) sync --frozen

test: sync ## Run every test against RABBITMQ_URL / DATABASE_URL (or testcontainers)
	$(UV) run pytest -n auto --maxprocesses 4  # grouped by what they share: tests/xdist_private.py

faults: sync ## Every fault scenario at full length on nodes of its own (RabbitMQ 4 with RABBITMQ4_ROOT; KIND=quorum for quorum queues); prints the table
	$(UV) run python -m tests.faults --kind $(KIND)

bench: sync ## Throughput and latency against raw baselines, 3 runs each (7-13 min); prints the table
	@command -v wrk >/dev/null || { echo "bench needs wrk: apt-get install wrk"; exit 1; }
	$(UV) run python -m bench

bench-peers: sync ## Celery, Dramatiq, taskiq and FastStream beside ours on the same broker and database (the peers in a venv of their own): enqueue, web endpoint, drains, priority; 3 runs (20-45 min); prints the tables
	$(UV) run python -m bench.peers

bench-kinds: sync ## make bench on a RabbitMQ 4 node of its own, a table for each queue kind (15-25 min)
	@command -v wrk >/dev/null || { echo "bench needs wrk: apt-get install wrk"; exit 1; }
	scripts/rabbitmq4.sh start orders-bench 5684
	RABBITMQCTL="scripts/rabbitmq4.sh ctl -n orders-bench@localhost" BENCH_RABBITMQ_PORT=5684 \
	  $(UV) run python -m bench --kind both

# The cluster's nodes: orders-bench-c1..3 on 5685-5687; the single node stops before they start
# (the benchmark counts every process in the root as the broker's).
BENCH_PHASES := submit16,relay,drain1,drain1_small,priority
bench-cluster: sync ## make bench's submit, relay, drain (large and small backlog) and priority phases with quorum queues on one RabbitMQ 4 node, then on a three-node cluster (15-25 min)
	@command -v wrk >/dev/null || { echo "bench needs wrk: apt-get install wrk"; exit 1; }
	scripts/rabbitmq4.sh start orders-bench 5684
	RABBITMQCTL="scripts/rabbitmq4.sh ctl -n orders-bench@localhost" BENCH_RABBITMQ_PORT=5684 \
	  $(UV) run python -m bench --kind quorum --only $(BENCH_PHASES)
	scripts/rabbitmq4.sh stop orders-bench
	# at once: a node that was not the last to stop waits for the others to start (a second run)
	for n in 1 2 3; do scripts/rabbitmq4.sh start orders-bench-c$$n $$((5684 + n)) & done; wait
	for n in 2 3; do scripts/rabbitmq4.sh join orders-bench-c$$n orders-bench-c1; done
	RABBITMQCTL="scripts/rabbitmq4.sh ctl -n orders-bench-c1@localhost" BENCH_RABBITMQ_PORT=5685,5686,5687 \
	  $(UV) run python -m bench --kind quorum --only $(BENCH_PHASES)
	for n in 1 2 3; do scripts/rabbitmq4.sh stop orders-bench-c$$n; done

# What synchronous replication costs: the same phases on one PostgreSQL 17 under Patroni, then on a
# primary with a synchronous standby and a second standby, each member on a host of its own.
HA_PHASES := submit16,drain1
bench-ha: sync ## make bench's submit and drain on one PostgreSQL 17, then on a primary with a synchronous standby (Patroni; 8-12 min)
	@command -v wrk >/dev/null || { echo "bench needs wrk: apt-get install wrk"; exit 1; }
	for database in alone failover; do \
	  RABBITMQ4_ROOT=$${RABBITMQ4_ROOT:-/var/cache/orders/trixie} \
	    $(UV) run python -m bench --only $(HA_PHASES) --database $$database || exit 1; \
	done

lint: sync ## ruff lint and format check
	$(UV) run ruff check .
	$(UV) run ruff format --check .

fmt: sync ## Format and fix what ruff can
	$(UV) run ruff format .
	$(UV) run ruff check --fix .

typecheck: sync ## mypy --strict
	$(UV) run mypy

clean: ## Remove the virtualenv, caches and test artifacts
	rm -rf .venv .tools .pytest_cache .mypy_cache .ruff_cache test-artifacts
