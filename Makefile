# kagent — `make help` lists the targets.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help install build test test-fast lint run bench clean fuzz soak
.PHONY: initrd test-vm

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

$(STAMP): setup.py pyproject.toml requirements.txt requirements-build.txt requirements-test.txt $(wildcard kagent/_fast/*.pyx) $(wildcard kagent/protocols/*.proto)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements-build.txt -r requirements.txt -r requirements-test.txt
	$(PIP) install --no-build-isolation -e .
	$(PY) setup.py -q build_ext --inplace
	$(PY) -c "import kagent._fast as f; print('kagent fast path:', f.status())"
	touch $@

install: $(STAMP) ## create ./.venv with kagent (editable), its dependencies and the compiled fast path

build: ## rebuild the protobuf modules and the Cython extensions in place
	$(PY) setup.py -q build_ext --inplace

test: $(STAMP) ## run the whole test suite (both fast-path and pure-Python twins)
	$(PY) -m compileall -q kagent  # bytecode on disk: the suite starts hundreds of agents
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

fuzz: $(STAMP) ## fuzz every input surface long and random (KAGENT_FUZZ_EXAMPLES=N per target)
	KAGENT_FUZZ=long KAGENT_ASYNC_TEST_TIMEOUT=36000 KAGENT_RELIABILITY_REPORT=$${KAGENT_RELIABILITY_REPORT:-/tmp/kagent-fuzz-report.json} \
		$(VENV)/bin/pytest -q -p no:cacheprovider -o timeout=0 tests/fuzz $(PYTEST_ARGS)

soak: $(STAMP) ## soak: 10000 exec and 600 create cycles, then fds/RSS/threads/mounts/cgroups checked
	KAGENT_SOAK=long KAGENT_ASYNC_TEST_TIMEOUT=36000 KAGENT_RELIABILITY_REPORT=$${KAGENT_RELIABILITY_REPORT:-/tmp/kagent-soak-report.json} \
		$(VENV)/bin/pytest -q -p no:cacheprovider -o timeout=0 tests/soak $(PYTEST_ARGS)

lint: $(STAMP) ## ruff, and mypy on the typed core
	$(VENV)/bin/ruff check kagent tests bench
	$(VENV)/bin/mypy kagent/ttrpc kagent/config.py kagent/log.py

run: $(STAMP) ## start kagent on a unix socket, drive it with kagent-ctl, stop it
	$(PY) -m kagent.demo

bench: $(STAMP) ## run the benchmarks; writes bench/results.json and bench/results.md
	$(PY) -m compileall -q kagent  # as the guest image has it (vm/build_initrd.py)
	$(PY) -m bench

initrd: $(STAMP) ## build the guest image (Debian kernel, initramfs with Python, kagent, busybox; cached)
	$(PY) -m vm.build_initrd

test-vm: $(STAMP) ## boot real guests under QEMU and drive kagent from the host (tests/vm, marker vm)
	$(PY) -m vm.build_initrd
	$(VENV)/bin/pytest -q -m vm tests/vm $(PYTEST_ARGS)

clean: ## remove build products (keeps .venv)
	rm -rf build *.egg-info kagent/_fast/*.so kagent/_fast/*.c kagent/protocols/*_pb2.py kagent/protocols/*_pb2.pyi
