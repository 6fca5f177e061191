# Kustody — the two commands are `make demo` and `make test`; both install what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum < pyproject.toml | cut -d' ' -f1)
PROTO_SRC := $(shell find proto -name '*.proto')
PROTO_STAMP := operator/kustody/api/_proto/.generated

.DEFAULT_GOAL := help
.PHONY: help install system-deps binaries proto lint typecheck contracts check test test-unit \
        test-hsm test-hsm-kryoptic test-cluster test-go kms-plugin demo demo-down dev-up dev-down bench-hsm bench-operator soak clean

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,dev]'
	@rm -f $(VENV)/.installed-*; touch $@

install: $(STAMP) system-deps proto ## Python deps into .venv, SoftHSM2, generated gRPC code

system-deps: ## SoftHSM2 (apt-get when root, else an instruction); Kryoptic built once, cached
	@bash tools/install-system-deps.sh
	@bash tools/install-kryoptic.sh

$(PROTO_STAMP): $(STAMP) $(PROTO_SRC)
	@mkdir -p $(@D)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=operator --pyi_out=operator \
	    --grpc_python_out=operator $(PROTO_SRC)
	@touch $@

proto: $(PROTO_STAMP) ## generate gRPC code from proto/ (never committed)

binaries: $(STAMP) ## build (once, cached) kube-apiserver, kube-controller-manager, kubectl, etcd, helm
	$(BIN)/kustody dev build

lint: $(STAMP) ## ruff (and gofmt on kms/)
	$(BIN)/ruff check operator tests bench tools
	$(BIN)/ruff format --check operator tests bench tools
	@unformatted=$$(gofmt -l kms); if [ -n "$$unformatted" ]; then echo "gofmt: $$unformatted" >&2; exit 1; fi

test-go: ## kustody-kms (kms/): go vet and its Go tests (envelope vectors, flags)
	cd kms && go vet ./... && go test -count=1 ./...

kms-plugin: $(STAMP) ## build kustody-kms, the Go KMS v2 plugin (cached; prints its path)
	@$(BIN)/python -c 'from kustody.dev import kmsplugin; print(kmsplugin.build())'

typecheck: $(STAMP) proto ## mypy --strict on the package
	$(BIN)/mypy

contracts: $(STAMP) ## import-linter layer contract
	$(BIN)/lint-imports

check: lint typecheck contracts ## static checks only

# The HSM layer (with the KMS v2 test) and the crash-safety test, once more on the second
# PKCS#11 implementation (Kryoptic), with token-generated GCM IVs only (the FIPS-style profile);
# the full suite runs on SoftHSM2 with caller IVs.
SECOND_TOKEN_TESTS := tests/hsm tests/cluster/test_crash_safety.py
SECOND_TOKEN_ENV := KUSTODY_TEST_TOKEN=kryoptic KUSTODY_HSM_GCM_IV=token
# The suite runs in TEST_WORKERS processes (pytest-xdist), each with its own control plane,
# tokens, sidecar and operator; whole modules stay in one process, in file order, and the
# longest groups start first (tests/conftest.py). TEST_WORKERS=1 runs it in one.
TEST_WORKERS ?= 2
PARALLEL := -n $(TEST_WORKERS) --dist loadscope

test: install binaries ## everything: static checks, unit, hsm, cluster, kind; the HSM layer again on Kryoptic
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory check test-go && \
	$(BIN)/pytest $(PARALLEL) tests; rc=$$?; \
	echo "make test: $$(( $$(date +%s) - start ))s for the suite on SoftHSM2 (after install)"; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; \
	if [ "$${KUSTODY_SKIP_KRYOPTIC:-}" = 1 ]; then echo "KUSTODY_SKIP_KRYOPTIC=1: HSM layer not run on Kryoptic"; exit $$rc; fi; \
	second=$$(date +%s); \
	$(SECOND_TOKEN_ENV) $(BIN)/pytest $(PARALLEL) $(SECOND_TOKEN_TESTS); rc2=$$?; \
	echo "make test: $$(( $$(date +%s) - second ))s for the HSM layer on Kryoptic (token IVs), $$(( $$(date +%s) - start ))s in all"; \
	if [ $$rc -ne 0 ]; then exit $$rc; fi; exit $$rc2

test-unit: install ## unit tests only (no HSM, no cluster)
	$(BIN)/pytest $(PARALLEL) tests/unit

test-hsm: install ## tests against a real SoftHSM2 token
	$(BIN)/pytest $(PARALLEL) tests/hsm

test-hsm-kryoptic: install binaries ## the HSM layer, KMS v2 and crash-safety tests on Kryoptic (token IVs)
	$(SECOND_TOKEN_ENV) $(BIN)/pytest $(PARALLEL) $(SECOND_TOKEN_TESTS)

test-cluster: install binaries ## tests against the real local control plane
	$(BIN)/pytest $(PARALLEL) tests/cluster

dev-up: install binaries ## start the local control plane in the background
	$(BIN)/kustody dev up

dev-down: ## stop everything `dev up` or `demo` started
	@if [ -x $(BIN)/kustody ]; then $(BIN)/kustody dev down; fi

demo: install binaries ## run Kustody on the local control plane + SoftHSM2 until Ctrl-C
	$(BIN)/kustody demo

demo-down: dev-down ## clean up after `make demo`

bench-hsm: install ## sidecar, unwrap and KMS v2 (vs a Go plugin) benchmarks, 3 interleaved runs each -> bench/results/hsm.json + hsm-*.png
	$(BIN)/python bench/hsm.py

bench-operator: install binaries ## operator scale (N=10000 adds that size; BENCH_REPEAT=3) -> bench/results/operator.json
	N=$(N) $(BIN)/python bench/operator_scale.py

bench-client: install ## keyset library: ratio to raw AESGCM, streaming RSS -> bench/results/client.json
	$(BIN)/python bench/client.py

clean: dev-down ## remove the venv and generated code (keeps the binary cache)
	rm -rf $(VENV) operator/kustody/*/_proto/*_pb2*.py* $(PROTO_STAMP)

soak: install binaries ## long run with faults (SOAK_MINUTES=15) -> bench/results/soak.{json,png}
	$(BIN)/python bench/soak.py

# -- containers: podman, no Docker engine, no registry (docs/kind.md) ------------------------
.PHONY: image kind-build test-kind
IMAGE ?= localhost/kustody:dev

image: ## build the image with podman (its base made from Debian here unless PYTHON_IMAGE is set)
	IMAGE=$(IMAGE) bash tools/image/build.sh

kind-build: install binaries ## kind, its node image and every image it preloads (built once, cached)
	$(BIN)/python tools/kind/build.py

test-kind: install binaries ## the image and kind end-to-end tests alone (tests/kind)
	$(BIN)/pytest tests/kind
