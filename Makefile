# Magnus: two commands do everything: `make run` and `make test` (see README.md).
SHELL := /bin/bash
PY := .venv/bin/python
DATA ?= ../shared/data
RUN_ARGS ?=
STAMP := .venv/.installed

.PHONY: run serve test venv proto lint-proto migrate model bootstrap calibrate simulate bench-decisions clean help node-deps chart-check

help:
	@echo "make run       set up everything, start all services, send the demo workload, stop"
	@echo "make serve     the same, but keep the stack running (supervised: crashed services restart) until Ctrl-C"
	@echo "make test      the test suite (needs PostgreSQL on 127.0.0.1:5432)"
	@echo "make calibrate time the worker over a grid of batch shapes into the log DB"
	@echo "make simulate  the paper's ablation in the simulator (reports/simulation/), the Phi sweep, point vs p90 planning"
	@echo "make bench-decisions  batcher decision speed with 10,000 requests queued"

$(STAMP): requirements.txt
	test -x .venv/bin/python || python3 -m venv .venv
	.venv/bin/pip install -q --upgrade pip
	# torch first and pinned: pip takes the CPU wheel, never a multi-GB CUDA build
	.venv/bin/pip install -q torch==2.13.0
	.venv/bin/pip install -q -r requirements.txt
	touch $(STAMP)

venv: $(STAMP)

# Generated code is not committed: it is built here, from protos/, into magnus/v1 (with .pyi stubs).
proto: $(STAMP)
	mkdir -p magnus/v1
	$(PY) -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. protos/magnus/v1/*.proto
	touch magnus/__init__.py magnus/v1/__init__.py

lint-proto: $(STAMP)
	cd protos && ../.venv/bin/buf lint

migrate: proto
	$(PY) -m services.shared.db upgrade

model: proto
	$(PY) -m services.worker.model_builder

calibrate: model migrate
	$(PY) -m services.worker.calibrate --grid small

# Migrations, the default model and the first model versions, each only where missing, in one
# process (a second `make run` pays one interpreter start, not five); prints each step's time.
bootstrap: proto
	$(PY) -m tools.bootstrap --data $(DATA)

run: bootstrap
	$(PY) -m tools.run_local --data $(DATA) $(RUN_ARGS)

serve: bootstrap
	$(PY) -m tools.run_local --data $(DATA) --serve $(RUN_ARGS)

# Two xdist workers (override: `make test TEST_WORKERS=4`, or 0 for one process). A module's tests
# stay on one worker (its stack starts once), modules taken in the order tests/conftest.py sets
# (those that start real processes first), not reordered by their number of tests.
TEST_WORKERS ?= 2
test: proto lint-proto node-deps chart-check
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

# The Node.js example client (tests/integration/test_node_client.py runs it against the batcher).
NODE_STAMP := clients/node/node_modules/.package-lock.json
$(NODE_STAMP): clients/node/package.json clients/node/package-lock.json
	npm ci --prefix clients/node --no-audit --no-fund
	touch $(NODE_STAMP)

node-deps: $(NODE_STAMP)

# Render the Helm chart offline (Helm's own Go SDK via helm-python-sdk), lint it, validate every
# manifest with kubernetes-validate --strict, and lint the Dockerfiles (deploy/check_chart.py).
chart-check: $(STAMP)
	$(PY) -m deploy.check_chart

# The committed reports in reports/simulation/ come from exactly these commands.
simulate: $(STAMP)
	$(PY) -m services.batcher.simulate --data $(DATA) --out reports/simulation/ablation_h200_hf_generate
	$(PY) -m services.batcher.simulate --data $(DATA) --cost-model h200-graph --rates 5,10,20,30,40,50,60 \
		--duration-s 300 --out reports/simulation/ablation_h200_graph
	$(PY) -m services.batcher.simulate.phi_sweep --data $(DATA) --rates 3,6,14
	$(PY) -m services.batcher.simulate.plan_quantile --data $(DATA) --out reports/simulation

bench-decisions: $(STAMP)
	$(PY) bench/decision_speed.py

clean:
	rm -rf var magnus .pytest_cache .hypothesis
