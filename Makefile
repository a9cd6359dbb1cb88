# eptrace: `sudo make demo` and `sudo make test` set everything up first (scripts/setup.sh is idempotent
# and fast when everything is already there, so no stamp file is used).
PYTHON := $(CURDIR)/.venv/bin/python

.PHONY: setup demo test unit bench clean

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
