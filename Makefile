# Two commands for a new user: `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.medray-installed

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medray demo --config jobs/configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest tests

bench: $(STAMP)
	$(BIN)/python benchmarks/decode_resize.py
	$(BIN)/python benchmarks/cache_epoch.py
	$(BIN)/python benchmarks/score_scale.py
	$(BIN)/python benchmarks/hostile_memory.py
	$(BIN)/python benchmarks/wsi_extract.py
	$(BIN)/python benchmarks/patient_bootstrap.py
	$(BIN)/python benchmarks/gpu_feed.py

clean:
	rm -rf runs .pytest_cache
