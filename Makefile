# eptrace: `sudo make demo` and `sudo make test` set everything up first (scripts/setup.sh is idempotent
# and fast when everything is already there, so no stamp file is used).
PYTHON := $(CURDIR)/.venv/bin/python

.PHONY: setup demo test unit bench clean install uninstall

setup:
	bash $(CURDIR)/scripts/setup.sh

demo: setup
	$(PYTHON) -m tracer.demo

test: setup
	$(PYTHON) -m pytest -q tests

# No root and no setup needed, only an existing venv.
unit:
	@test -x $(PYTHON) || { echo "no .venv yet: run 'sudo make setup' once" >&2; exit 1; }
	$(PYTHON) -m pytest -q tests/unit

bench: setup
	$(PYTHON) -m bench

clean:
	rm -rf .venv build dist *.egg-info .pytest_cache
	find . -path ./.git -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +
	@if [ -L /usr/local/bin/eptrace ] && [ "$$(readlink /usr/local/bin/eptrace)" = "$(CURDIR)/.venv/bin/eptrace" ]; then \
		rm -f /usr/local/bin/eptrace 2>/dev/null || true; fi

# ---- a system-wide install: `sudo make install` (README: "Running on a fleet") -------------------------------
# scripts/install.sh says what goes where. DESTDIR stages the install under a root; `make uninstall` removes
# exactly what `make install` added (by the manifest it wrote).
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib/eptrace
UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSCONFDIR ?= /etc
INSTALL_PYTHON ?= /usr/bin/python3
INSTALL_VARS = DESTDIR="$(DESTDIR)" BINDIR="$(BINDIR)" LIBDIR="$(LIBDIR)" UNITDIR="$(UNITDIR)" \
	SYSCONFDIR="$(SYSCONFDIR)" INSTALL_PYTHON="$(INSTALL_PYTHON)"

install:
	$(INSTALL_VARS) bash $(CURDIR)/scripts/install.sh install

uninstall:
	$(INSTALL_VARS) bash $(CURDIR)/scripts/install.sh uninstall
