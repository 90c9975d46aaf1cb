# Both targets do all of their own set-up on a fresh machine with Python 3.11, installing the
# exact versions in requirements/lock.txt (see README: "Installs are locked").
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements/lock.txt
LATEST := .venv-latest
DEBIAN_GI := /usr/lib/python3/dist-packages/gi
UV_VERSION := 0.13.9

.PHONY: demo test lint bench clean lock test-latest

# Aravis (the GenICam camera driver) comes through Debian's GObject bindings; a venv sees
# that one package, built for this Python version, and nothing else of Debian's.
define link_debian_gi
	@if ! $(1)/bin/python -c "import gi" 2>/dev/null && ls $(DEBIAN_GI)/_gi.cpython-311-*.so >/dev/null 2>&1; then \
		mkdir -p $(1)/debian-gi && ln -sfn $(DEBIAN_GI) $(1)/debian-gi/gi && \
		echo "$(abspath $(1))/debian-gi" > "$$($(1)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/debian-gi.pth"; \
	fi
endef

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	@# The installer and the build back-end first, at their locked versions; then the project
	@# built with those (no isolated build env, which would fetch the newest setuptools).
	$(PY) -m pip install -q -c $(LOCK) pip setuptools wheel
	$(PY) -m pip install -q -c $(LOCK) --no-build-isolation -e '.[test]'
	$(call link_debian_gi,$(VENV))
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tapescope demo --out demo-out --overwrite

test: $(STAMP)
	$(VENV)/bin/ruff check tapescope tests bench
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check tapescope tests bench

bench: $(STAMP)
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

# The lock from pyproject.toml's ranges, for every platform, Python 3.11 tested. Pins already in
# the lock are kept; `make lock UPGRADE=1` moves every package to its newest allowed release.
lock:
	@test -x .venv-lock/bin/uv || ($(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install -q uv==$(UV_VERSION))
	.venv-lock/bin/uv pip compile pyproject.toml requirements/tools.in --extra test --extra gui --extra gpu \
		--universal --python-version 3.11 $(if $(UPGRADE),--upgrade) --custom-compile-command "make lock" \
		-q -o $(LOCK)

# The next break before a user meets it: a separate venv from the newest releases that
# pyproject.toml allows (no lock), then the whole suite there. Prints what differs from the lock.
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip setuptools wheel
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e '.[test]'
	$(call link_debian_gi,$(LATEST))
	@$(LATEST)/bin/python requirements/drift.py $(LOCK)
	$(LATEST)/bin/ruff check tapescope tests bench
	$(LATEST)/bin/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf $(VENV) $(LATEST) .venv-lock demo-out .pytest_cache
