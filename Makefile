# The README's two commands are `make demo` and `make test`; .ci/run calls `make test`.
PY ?= python3
PIP ?= $(PY) -m pip

.PHONY: install install-dev demo test test-fast slurm-up slurm-down slurm-status test-slurm gpu-check gpu-kit

install:
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -e .

install-dev: install
	$(PIP) install -q -e '.[dev]'

demo: install
	pixart-ds demo

test: install-dev slurm-up
	$(PY) -m pytest -q

test-fast:
	$(PY) -m pytest -q -m "not slurm"

slurm-up:
	bash slurm/local-cluster.sh up

slurm-down:
	bash slurm/local-cluster.sh down

slurm-status:
	bash slurm/local-cluster.sh status

test-slurm: slurm-up
	$(PY) -m pytest -q tests/test_slurm.py tests/test_multinode.py

# The offline wheel folder for a GPU machine (benchmarks/gpu_kit.py; carried as gpu_kit/, ignored by git).
gpu-kit:
	$(PY) benchmarks/gpu_kit.py build

gpu-check:
	bash benchmarks/gpu_check.sh
