# Two commands on a fresh machine: `make demo` (the quickstart) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The CPU build of torch that this project pins where no NVIDIA GPU is present
# (an unpinned `torch` would pull a multi-GB CUDA build); real users keep torch>=2.4.
CPU_TORCH ?= torch==2.13.0

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
		echo "no NVIDIA GPU found: installing the CPU build $(CPU_TORCH)"; \
		$(BIN)/pip install --quiet "$(CPU_TORCH)"; \
	fi
	$(BIN)/pip install --quiet -e ".[test]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/yt8m quickstart

test: $(STAMP)
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_loader.py
	$(BIN)/python benchmarks/bench_metrics.py

clean:
	rm -rf $(VENV) yt8m-quickstart .pytest_cache
