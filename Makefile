# vbp: the two commands of the README quick start are `make run` and `make test`.
# Everything the project needs is installed here, on a fresh Debian machine, as root.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SANDBOX_DIR ?= var/sandbox

# Debian packages: runtime (make run) and test-only (make test). gcc, the headers and
# libxxhash-dev build vbp's C extension (vbp/_pagesums.c) when the venv installs vbp.
APT_RUN := python3-venv python3-dev gcc libc6-dev libxxhash-dev qemu-utils libnbd-bin
APT_TEST := $(APT_RUN) python3-libnbd nbdkit fio etcd-server qemu-system-x86 iproute2 \
            e2fsprogs mount

.PHONY: run test deps-run deps-test venv bench clean

run: deps-run venv
	$(VENV)/bin/vbp sandbox run --hosts 3 --dir $(SANDBOX_DIR) --volume demo --size 1G

# The tests of one process and the simulation (tests/unit, tests/sim, tests/conformance)
# run on PYTEST_WORKERS workers (pytest-xdist, one file per worker at a time); then the
# fault and interop tests of real processes (tests/faults, tests/interop) one at a time:
# they time leases and heartbeats on the machine's clock, and share network namespaces
# and host settings. Both parts run, whatever the first gave. PYTEST_ARGS go to both.
PYTEST_WORKERS ?= 2
test: deps-test venv
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadfile tests/unit tests/sim tests/conformance \
	    $(PYTEST_ARGS); one=$$?; \
	$(PY) -m pytest tests/faults tests/interop $(PYTEST_ARGS); two=$$?; \
	test $$one -eq 0 && test $$two -eq 0

bench: deps-test venv
	$(PY) -m pip install -q -e '.[test,bench]'
	$(PY) -m bench $(BENCH_ARGS)

deps-run:
	@scripts/apt-install $(APT_RUN)

deps-test:
	@scripts/apt-install $(APT_TEST)

# The venv is rebuilt when pyproject.toml changes. Debian's libnbd binding (`import nbd`)
# lives in the system dist-packages; a .pth file exposes exactly that module to the venv
# (the PyPI package named `nbd` is unrelated and must never be installed).
venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py vbp/_pagesums.c
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	scripts/link-libnbd $(VENV)
	touch $@

clean:
	-$(VENV)/bin/vbp sandbox down --dir $(SANDBOX_DIR)
	rm -rf $(VENV) var
