# Kustody — the two commands are `make demo` and `make test`; both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
PROTO_SRC := $(shell find proto -name '*.proto')
PROTO_STAMP := operator/kustody/hsm/_proto/.generated

.DEFAULT_GOAL := help
.PHONY: help install system-deps binaries proto lint typecheck contracts check test test-unit \
        test-hsm test-cluster demo demo-down dev-up dev-down bench-hsm bench-operator clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,dev]'
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP) system-deps proto ## Python deps into .venv, SoftHSM2, generated gRPC code

system-deps: ## SoftHSM2 (apt-get when root, else an instruction)
	@bash tools/install-system-deps.sh

$(PROTO_STAMP): $(STAMP) $(PROTO_SRC)
	@mkdir -p $(@D)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=operator --pyi_out=operator \
	    --grpc_python_out=operator $(PROTO_SRC)
	@touch $@

proto: $(PROTO_STAMP) ## generate gRPC code from proto/ (never committed)

binaries: $(STAMP) ## build (once, cached) kube-apiserver, kube-controller-manager, kubectl, etcd, helm
	$(BIN)/kustody dev build

lint: $(STAMP) ## ruff
	$(BIN)/ruff check operator tests bench tools
	$(BIN)/ruff format --check operator tests bench tools

typecheck: $(STAMP) proto ## mypy --strict on the package
	$(BIN)/mypy

contracts: $(STAMP) ## import-linter layer contract
	$(BIN)/lint-imports

check: lint typecheck contracts ## static checks only

test: install binaries ## everything: static checks, then unit, hsm, cluster and kind tests
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory check && \
	$(BIN)/pytest tests; rc=$$?; \
	echo "make test: $$(( $$(date +%s) - start ))s (after install)"; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

test-unit: install ## unit tests only (no HSM, no cluster)
	$(BIN)/pytest tests/unit

test-hsm: install ## tests against a real SoftHSM2 token
	$(BIN)/pytest tests/hsm

test-cluster: install binaries ## tests against the real local control plane
	$(BIN)/pytest tests/cluster

dev-up: install binaries ## start the local control plane in the background
	$(BIN)/kustody dev up

dev-down: ## stop everything `dev up` or `demo` started
	@if [ -x $(BIN)/kustody ]; then $(BIN)/kustody dev down; fi

demo: install binaries ## run Kustody on the local control plane + SoftHSM2 until Ctrl-C
	$(BIN)/kustody demo

demo-down: dev-down ## clean up after `make demo`

bench-hsm: install ## HSM sidecar benchmark -> bench/results/hsm.json
	$(BIN)/python bench/hsm.py

bench-operator: install binaries ## operator scale benchmark -> bench/results/operator.json
	$(BIN)/python bench/operator_scale.py

clean: dev-down ## remove the venv and generated code (keeps the binary cache)
	rm -rf $(VENV) operator/kustody/*/_proto/*_pb2*.py* $(PROTO_STAMP)
