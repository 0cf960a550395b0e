# make test   set up .venv from scratch (CPU torch, no torchvision) and run the test suite
# make demo   set up and run `python train.py task=lidc adv=pgd` on the embedded LIDC phantom
# make bench  set up and print the benchmark ratios (training cost, attack engine, attack memory, HD95)

VENV ?= .venv
PY := $(VENV)/bin/python
# the local CPU build; on a CUDA machine: make setup TORCH_SPEC="torch==2.13.0 --index-url ..."
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test demo bench
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

test: setup
	$(PY) -m pytest -n 2 --dist loadgroup   # two workers, one per core (tests/conftest.py: shared fixtures, order)

demo: setup
	$(PY) train.py task=lidc adv=pgd

bench: setup
	$(PY) bench/bench_training.py --epochs 4
	$(PY) bench/bench_training.py --task brainage --epochs 4
	$(PY) bench/bench_attacks.py
	$(PY) bench/bench_attack_memory.py
	$(PY) bench/bench_metrics.py
