# Descent: `make demo` runs the whole thing on a laptop; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch goes in first and pinned: this version lies on our machines as a local CPU
# build, and letting pip pick a newer one pulls gigabytes of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0
# torchvision goes in next, pinned to the release built for that torch (it requires it
# exactly), with --no-deps so pip never touches torch. PyPI's build is a CUDA one:
# trainer/vision.py imports it beside the CPU torch.
TORCHVISION_SPEC ?= torchvision==0.28.0

.PHONY: venv demo up api worker mlflow migrate test test-unit test-integration test-security test-faults bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --no-deps "$(TORCHVISION_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

demo: venv  ## embedded stack, three jobs on digits, a table of results, then stop
	$(PY) -m launcher.demo

up: venv  ## the whole stack in the foreground (settings from the environment)
	$(PY) -m launcher.up

api: venv
	$(PY) -m launcher.run api

worker: venv
	$(PY) -m launcher.run worker

mlflow: venv
	$(PY) -m launcher.run mlflow

migrate: venv
	$(PY) -m launcher.run migrate

test: test-unit test-integration test-security test-faults

test-unit: venv
	$(PY) -m pytest tests/unit -q -p no:cacheprovider

test-integration: venv  ## needs PostgreSQL (127.0.0.1:5432) and Redis (127.0.0.1:6379)
	$(PY) -m pytest tests/integration -q -p no:cacheprovider

test-security: venv  ## attacks from issue 14 against a real stack (needs PostgreSQL, Redis)
	$(PY) -m pytest tests/security -q -p no:cacheprovider

test-faults: venv  ## chaos: worker SIGKILLs, a Redis and an MLflow restart under load (needs PostgreSQL, redis-server)
	$(PY) -m pytest tests/faults -q -p no:cacheprovider -s

bench: venv
	$(PY) bench/trainer_overhead.py

clean:
	rm -rf .descent
