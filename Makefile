# Ops-Core: `make serve` runs the server, `make test` runs every check. Both set up .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTO_FILES := $(sort $(wildcard protos/opscore/v1/*.proto))
# The googleapis protos ours import (field_behavior.proto), copied from the installed
# googleapis-common-protos package, which also provides their generated code at run time.
PROTO_DEPS := build/proto-deps
FIELD_BEHAVIOR := $(PROTO_DEPS)/google/api/field_behavior.proto
# The v1 contract as released: `buf breaking` holds every change to it wire-compatible.
CONTRACT_BASELINE := protos/opscore-v1-baseline.json
# Never let the working directory shadow the installed package: `opscore` here has no `v1`,
# the installed one maps it to generated/opscore/v1.
export PYTHONSAFEPATH := 1

# The editable install is strict (a tree of links), which is what maps opscore.v1 onto
# generated/; it must be redone when files are added or removed, so its stamp depends on the
# list of package files.
PACKAGE_FILES := $(shell find opscore generated -type f \( -name '*.py' -o -name '*.pyi' -o -name 'py.typed' -o -name '*.mako' \) 2>/dev/null | sort)

.PHONY: serve test check lint format typecheck buf-lint buf-breaking generate check-generated \
	proto-deps pytest bench clean FORCE

serve: $(VENV)/.runtime
	$(BIN)/opscore serve

test: check pytest

check: lint typecheck buf-lint buf-breaking check-generated

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.files: FORCE | $(VENV)/bin/python
	@echo '$(PACKAGE_FILES)' | cmp -s - $@ || echo '$(PACKAGE_FILES)' > $@

$(VENV)/.runtime: pyproject.toml $(VENV)/.files | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e '.[uvloop,tools]' --config-settings editable_mode=strict
	@touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.files | $(VENV)/bin/python
	$(BIN)/python -m pip install --quiet -e '.[dev,uvloop,tools]' --config-settings editable_mode=strict
	@touch $@ $(VENV)/.runtime

lint: $(VENV)/.dev
	$(BIN)/ruff check opscore tests bench examples
	$(BIN)/ruff format --check opscore tests bench examples

format: $(VENV)/.dev
	$(BIN)/ruff check --fix opscore tests bench examples
	$(BIN)/ruff format opscore tests bench examples

typecheck: $(VENV)/.dev
	$(BIN)/mypy --strict opscore bench examples/agent.py

# googleapis-common-protos is a runtime dependency, so the runtime install is enough.
$(FIELD_BEHAVIOR): $(VENV)/.runtime
	@mkdir -p $(@D)
	cp "$$($(BIN)/python -c 'import pathlib, google.api.field_behavior_pb2 as m; \
		print(pathlib.Path(m.__file__).with_name("field_behavior.proto"))')" $@

# The imports our protos need beyond protos/, for code generators of other languages
# (examples/node-agent compiles against protos/ and this directory).
proto-deps: $(FIELD_BEHAVIOR)

buf-lint: $(VENV)/.dev $(FIELD_BEHAVIOR)
	$(BIN)/buf lint

# A change that breaks the wire or JSON compatibility of v1 fails here. The baseline was written
# by `buf build protos --exclude-source-info -o $(CONTRACT_BASELINE)`; it changes only with a
# new major version of the contract, or to take in file options that change no wire or JSON form
# and no generated Python (written again when the per-language package options were added).
buf-breaking: $(VENV)/.dev $(FIELD_BEHAVIOR)
	$(BIN)/buf breaking protos --against $(CONTRACT_BASELINE)

# grpcio-tools writes the messages and services, mypy-protobuf the .pyi stubs that make them
# type-checkable. The output is committed so users need no protoc.
define protoc
rm -rf $(1)/opscore/v1 && mkdir -p $(1)/opscore/v1 && \
PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m grpc_tools.protoc -Iprotos -I$(PROTO_DEPS) \
	--python_out=$(1) --grpc_python_out=$(1) --mypy_out=quiet:$(1) --mypy_grpc_out=quiet:$(1) \
	$(PROTO_FILES) && \
printf '"""Generated from protos/opscore/v1 by `make generate`: do not edit."""\n' \
	> $(1)/opscore/v1/__init__.py && \
touch $(1)/opscore/v1/py.typed
endef

generate: $(VENV)/.dev $(FIELD_BEHAVIOR)
	$(call protoc,generated)

check-generated: $(VENV)/.dev $(FIELD_BEHAVIOR)
	@tmp=$$(mktemp -d) && $(call protoc,$$tmp) && \
	if diff -r generated/opscore/v1 $$tmp/opscore/v1; then rm -rf $$tmp; else rm -rf $$tmp; \
	echo "generated/ is stale: run 'make generate' and commit the result"; exit 1; fi

# Test files run on TEST_WORKERS processes at once (pytest-xdist), each file's tests on one of
# them: most tests wait on servers and databases more than they compute.
TEST_WORKERS ?= 2

pytest: $(VENV)/.dev
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

# The benchmark (bench/): Ops-Core against a bare grpc.aio server, results in bench/results/.
# `bench` lives at the repository root, so the root must be importable here; bench/__init__.py
# moves it behind the installed packages so `opscore` is still the installed one (with its v1).
bench: $(VENV)/.dev
	PYTHONSAFEPATH= $(BIN)/python -m bench $(BENCH_ARGS)


clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .coverage
