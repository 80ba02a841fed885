# The README's commands. Each target first creates or refreshes .venv (cheap when nothing changed).
PY := .venv/bin/python
SPEC ?= jobs/demo.yaml

.PHONY: venv demo test lint fast-test docs
venv:
	@bash scripts/venv.sh

# A second `make demo` is refused while results/demo holds a run: ARGS=--overwrite replaces it, ARGS=--resume
# continues it.
demo: venv
	$(PY) -m capsafe.cli run $(SPEC) $(ARGS)

# Two pytest-xdist workers: the tests that start Ray clusters run one after another on one of them, the rest
# beside them on the other (tests/conftest.py says why).
test: venv
	@bash scripts/ensure_browser.sh
	$(PY) -m pytest -x -q -ra -n 2 --dist loadgroup tests

fast-test: venv
	@bash scripts/ensure_browser.sh
	$(PY) -m pytest -x -q -n 2 --dist loadgroup -m "not slow" tests

lint: venv
	$(PY) -m ruff check capsafe tests benchmarks scripts
	$(PY) -m mypy capsafe

docs: venv
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs serve
