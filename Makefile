# Ark Sandbox: `make demo` and `make test` set themselves up on first use.
VENV    := .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.ark-installed
SIM_STAMP := $(VENV)/.ark-simulation-installed
WORKDIR ?= .ark-demo

.PHONY: demo test lint typecheck unit bench protos protos-check clean gateway-tools

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned: this exact version installs the CPU build from local disk.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The scale bench's simulation engine (Ray): only make bench needs it.
$(SIM_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,simulation]'
	touch $(SIM_STAMP)

# The provider's node-facing gateway is Debian's nginx, and the demo's test hosts are
# network namespaces (iproute2's `ip netns`, which need root): installed here when missing
# (nginx as root or with passwordless sudo, iproute2 as root), so demo, tests and bench
# find them. Without namespaces, the demo runs every party on loopback and says so.
gateway-tools:
	@missing=""; \
	command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx || missing="nginx"; \
	[ "$$(id -u)" != 0 ] || command -v ip >/dev/null 2>&1 || test -x /usr/sbin/ip || \
		test -x /sbin/ip || missing="$$missing iproute2"; \
	if [ -n "$$missing" ]; then \
		SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
		echo "installing$$missing (Debian) for the provider's gateway and the test hosts"; \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
			$$missing >/dev/null; fi

demo: $(STAMP) gateway-tools
	$(BIN)/ark demo --workdir $(WORKDIR)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy sandbox server clients tests bench

unit: $(STAMP) gateway-tools
	$(BIN)/pytest --durations=15

test: lint typecheck protos-check unit

# Generated protobuf/gRPC modules are committed; this is the one command that makes them.
protos: $(STAMP)
	PYTHON=$(BIN)/python protos/generate.sh

# Fails when the committed generated code differs from what the .proto sources produce.
protos-check: $(STAMP)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	PYTHON=$(BIN)/python protos/generate.sh "$$tmp" && \
	for f in $$(cd "$$tmp" && find protos -type f | sort); do \
		diff -u "$$f" "$$tmp/$$f" || { echo "$$f is stale: run make protos" >&2; exit 1; }; \
	done && echo "generated protos are up to date"

bench: $(SIM_STAMP) gateway-tools
	$(BIN)/python -m bench.run

clean:
	rm -rf $(WORKDIR) .pytest_cache .mypy_cache .ruff_cache
