# Common tasks. The two commands a newcomer needs are `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
DEMO_BUCKET ?= $(HOME)/cloudfs-demo/bucket
DEMO_MNT ?= $(HOME)/cloudfs-demo/mnt
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
COMMANDS := cloudfs mount.cloudfs

.PHONY: runtime deps install uninstall demo demo-stop test test-fast lint fmt bench clean

# What cloudfs itself needs (FUSE, a venv with cloudfs and its SDKs), quietly.
runtime:
	@./scripts/install-deps.sh --runtime

# Everything the tests need besides: rclone, s3fs, fio, Swift, Azurite, the test extras.
deps:
	./scripts/install-deps.sh

# `cloudfs` and `mount.cloudfs` on PATH: symlinks in $(BINDIR) to this checkout's venv.
install: runtime
	@install -d "$(DESTDIR)$(BINDIR)"
	@for c in $(COMMANDS); do ln -sfn "$(CURDIR)/$(VENV)/bin/$$c" "$(DESTDIR)$(BINDIR)/$$c"; done
	@echo "installed: $(foreach c,$(COMMANDS),$(DESTDIR)$(BINDIR)/$(c)) -> $(CURDIR)/$(VENV)/bin/"

# Removes only the links `make install` made.
uninstall:
	@for c in $(COMMANDS); do \
	  if [ "$$(readlink "$(DESTDIR)$(BINDIR)/$$c")" = "$(CURDIR)/$(VENV)/bin/$$c" ]; then \
	    rm -f "$(DESTDIR)$(BINDIR)/$$c"; echo "removed $(DESTDIR)$(BINDIR)/$$c"; fi; done

# Mount a local-disk bucket with a few sample files and list it.
demo: runtime
	@./scripts/demo.sh "$(DEMO_BUCKET)" "$(DEMO_MNT)"

demo-stop:
	$(VENV)/bin/cloudfs umount "$(DEMO_MNT)"

# Install everything (apt, Python deps, test servers), lint, then run every test tier in two
# pytest-xdist workers (tests/conftest.py: which tests share a worker).
test: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -ra -n 2 --dist loadgroup

test-fast:
	CLOUDFS_TEST_BACKENDS=local $(VENV)/bin/pytest -q -x

# ruff, and mypy over the three packages (the annotations are checked, not decoration).
lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy --ignore-missing-imports --python-version 3.11 cloudfs backends cache

fmt:
	$(VENV)/bin/ruff check --fix .

bench: deps
	$(PY) bench/run.py

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache
