# meshgate: `make demo` to try it, `make test` to check it.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# Debian tools the tests drive, as command:package; installed when missing.
DEB_TOOLS := openssl:openssl dig:dnsutils nft:nftables curl:curl ip:iproute2 nsenter:util-linux

# The proxy's per-request modules are compiled with mypyc (mesh/proxy/native.py);
# any change to the proxy's sources compiles them again.
NATIVE_SOURCES := $(wildcard mesh/proxy/*.py)
NATIVE  := build/native/.built

.PHONY: test demo bench lint typecheck pytest tools venv native clean kind-demo kind-demo-down

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

native: $(NATIVE)

$(NATIVE): $(STAMP) $(NATIVE_SOURCES) native_build.py
	$(PY) native_build.py
	mkdir -p $(dir $@) && touch $@

tools:
	@missing=""; for pair in $(DEB_TOOLS); do \
	  command -v "$${pair%%:*}" >/dev/null 2>&1 || missing="$$missing $${pair##*:}"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP) tools $(NATIVE)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q

test: lint typecheck pytest

demo: $(STAMP) $(NATIVE) tools
	$(PY) -m localcluster.demo --state-dir demo-state

# Two kind clusters with meshgate, linked (kind-configs/demo.sh); needs kind and docker,
# so it is not part of `make test`, which runs the same meshgate commands on the
# embedded clusters.
kind-demo: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" kind-configs/demo.sh

kind-demo-down:
	kind delete cluster --name east
	kind delete cluster --name west

bench: $(STAMP) tools $(NATIVE)
	$(PY) bench/apiserver.py
	$(PY) bench/identity.py
	$(PY) bench/dataplane.py
	$(PY) bench/control.py
	$(PY) bench/multicluster.py
	$(PY) bench/assertion.py
	$(PY) bench/soak.py
	$(PY) bench/vm.py
	$(PY) bench/failover.py

clean:
	rm -rf $(VENV) demo-state .mypy_cache .ruff_cache .pytest_cache .hypothesis build
	rm -f mesh/proxy/*.so
