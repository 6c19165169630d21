# Two commands matter: `make reproduce` (set up, then run every notebook) and `make test`.
PYTHON ?= python3
PROFILE ?= auto
TEST_OUTPUTS := $(CURDIR)/outputs/_test

.PHONY: setup test reproduce smoke cpu-profile lab strip benchmark

setup:  ## install pinned dependencies and cdlib (editable)
	$(PYTHON) -m pip install -q -r requirements.txt
	$(PYTHON) -m pip install -q --no-deps -e .

test: setup  ## unit tests + every notebook under nbval (smoke profile, fresh outputs)
	rm -rf $(TEST_OUTPUTS)
	CDLIB_OUTPUTS=$(TEST_OUTPUTS) CDLIB_PROGRESS=0 $(PYTHON) -m pytest

reproduce: setup  ## fetch CIFAR if missing, then every notebook in order: paper with CUDA, smoke otherwise (PROFILE=cpu, quick, a .toml file)
	$(PYTHON) -m cdlib pipeline --profile $(PROFILE) --download

smoke: setup  ## the whole pipeline on a CPU in minutes
	$(PYTHON) -m cdlib pipeline --profile smoke

CPU_DATASET ?= imagefolder:cifar10-jpeg
cpu-profile: setup  ## the cpu profile on real CIFAR-10 (2 CPU workers), then docs/RESULTS.md and docs/cpu-profile/; set CDLIB_OUTPUTS outside the work tree
	$(PYTHON) -m cdlib pipeline --profile cpu --set dataset=$(CPU_DATASET) --executor local --cpu-workers 2
	$(PYTHON) -m cdlib results --profile cpu --set dataset=$(CPU_DATASET)
	$(PYTHON) -m cdlib publish --to docs/cpu-profile

lab: setup
	$(PYTHON) -m jupyter lab notebooks/

strip:  ## remove outputs from the notebooks in git
	$(PYTHON) -m jupyter nbconvert --clear-output --inplace notebooks/*.ipynb

benchmark: setup
	$(PYTHON) benchmarks/train_throughput.py
