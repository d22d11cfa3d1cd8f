# Common tasks. The two commands a newcomer needs are `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
DEMO_BUCKET ?= $(HOME)/cloudfs-demo/bucket
DEMO_MNT ?= $(HOME)/cloudfs-demo/mnt

.PHONY: install demo demo-stop test test-fast lint fmt bench clean

install:
	./scripts/install-deps.sh

# Mount a local-disk bucket with a few sample files and list it.
demo: install
	./scripts/demo.sh "$(DEMO_BUCKET)" "$(DEMO_MNT)"

demo-stop:
	$(VENV)/bin/cloudfs umount "$(DEMO_MNT)"

# Install everything (apt, Python deps, test servers), lint, then run every test tier.
test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -ra

test-fast:
	CLOUDFS_TEST_BACKENDS=local $(VENV)/bin/pytest -q -x

# ruff, and mypy over the three packages (the annotations are checked, not decoration).
lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy --ignore-missing-imports --python-version 3.11 cloudfs backends cache

fmt:
	$(VENV)/bin/ruff check --fix .

bench: install
	$(PY) bench/run.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
