# Two commands on a fresh clone:
#   make demo   # set up, then run the whole SELMA pipeline on configs/demo.yaml (tiny random models)
#   make test   # set up, then lint and run the test suite
# Uses the active virtual environment if there is one, else creates .venv here.

ifdef VIRTUAL_ENV
VENV := $(VIRTUAL_ENV)
else
VENV := .venv
endif
PY := $(VENV)/bin/python
STAMP := $(VENV)/.selma-installed
# torch is installed first and pinned; which build pip picks depends on the machine's pip settings
# (the CPU wheel where pip is pointed at one, else PyPI's default build for the platform).
# Override, e.g. TORCH_SPEC="torch==2.9.1" or a CPU index with PIP_INDEX_URL.
TORCH_SPEC ?= torch==2.13.0
# The rest at the versions CI tested (constraints.txt); CONSTRAINTS= lets the installer pick the newest.
CONSTRAINTS ?= constraints.txt
# TORCH_SPEC again, so that no dependency's requirement swaps the torch just installed for another build.
INSTALL_ARGS = $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[test,kubernetes]" "$(TORCH_SPEC)"
UV := $(VENV)/bin/uv
# Test files run in parallel on up to 4 cores (each file in one worker, so a file's module fixtures,
# such as the kill-anywhere reference run, are built once). PYTEST_ARGS="" runs them one by one.
# --no-loadscope-reorder: files go out in collection order, where tests/conftest.py puts the files of
# slow tests first; xdist's own order (most tests first) sent the one-test e2e files, minutes each,
# last, and one worker ran the last of them alone while the other idled.
PYTEST_ARGS ?= -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder

.PHONY: demo test lint install compile clean

$(PY):
	python3 -m venv $(VENV)

# uv installs the other ~170 packages in about 10 s where pip takes about 2 minutes (most of a CI
# run's set-up). pip is the fallback wherever uv can't be had or can't reach the index: uv reads no
# pip.conf, so a mirror set only there is pip's alone.
# --compile-bytecode: pip compiles each module at install, uv does not. Where PYTHONDONTWRITEBYTECODE
# is set (as on this project's machines), nothing compiled is ever kept, so every process compiled
# MLflow, transformers and the rest again as it imported them: 17 s instead of 12 s for the fork
# server's imports, and as much more for each job started as a fresh process.
$(STAMP): pyproject.toml constraints.txt | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	($(PY) -m pip install -q uv && $(UV) pip install -q --compile-bytecode --python $(PY) $(INSTALL_ARGS)) \
		|| $(PY) -m pip install -q $(INSTALL_ARGS)
	touch $(STAMP)

# The project's own modules, compiled ahead for the same reason (they change between runs: this
# recompiles only what changed).
compile: $(STAMP)
	$(PY) -m compileall -q -j 0 selma_core jobs

install: $(STAMP)

demo: compile
	$(PY) -m jobs.submit --phase all --config configs/demo.yaml

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: compile
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	bash scripts/ensure-browser.sh  # chromium for tests/test_human_eval.py (installs it as root with apt-get)
	UV=$(UV) bash scripts/ensure-checkov.sh  # checkov for tests/k8s/test_checkov.py (its own venv, .venv-checkov/)
	$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf selma-data
