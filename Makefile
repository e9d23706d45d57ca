# Two entry points for a fresh machine: `make demo` and `make test`.
# Each builds .venv from requirements-lock.txt when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# FULL=1 also runs the tests marked `big` (CI does).
PYTEST_FLAGS := $(if $(FULL),--run-big,)
# Test workers (pytest-xdist): one per core, at most 4 (each holds torch and TVM); tests marked `serial` run last,
# alone. JOBS=0 runs everything in this process (pdb, -s).
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 4 ? n : 4 )))

.PHONY: demo test lint venv clean

venv: $(STAMP)

$(STAMP): requirements-lock.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-lock.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m prune_compile.cli prune_compile/data/default_model.onnx -o demo-out --ratio 0.5 --target cpu \
		--measure-latency
	@echo "report: demo-out/report.html (data: demo-out/report.json, plan: demo-out/plan.json)"

test: $(STAMP)
	$(PY) -m pytest -n $(JOBS) $(PYTEST_FLAGS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check prune_compile tools tests

clean:
	rm -rf $(VENV) demo-out .pytest_cache
