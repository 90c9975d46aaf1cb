# Both targets do all of their own set-up on a fresh machine with Python 3.11.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEBIAN_GI := /usr/lib/python3/dist-packages/gi

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@# Aravis (the GenICam camera driver) comes through Debian's GObject bindings; the venv
	@# sees that one package, built for this Python version, and nothing else of Debian's.
	@if ! $(PY) -c "import gi" 2>/dev/null && ls $(DEBIAN_GI)/_gi.cpython-311-*.so >/dev/null 2>&1; then \
		mkdir -p $(VENV)/debian-gi && ln -sfn $(DEBIAN_GI) $(VENV)/debian-gi/gi && \
		echo "$(abspath $(VENV))/debian-gi" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/debian-gi.pth"; \
	fi
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

clean:
	rm -rf $(VENV) demo-out .pytest_cache
