# Set-up and the two main jobs. `make bench` and `make test` create (or reuse) the virtual environment .venv
# and install what is needed: torch's CPU wheel pinned first, so nothing pulls a multi-GB CUDA build, then
# torchrec's CPU stack (torchrec itself with --no-deps: its metadata asks for the CUDA fbgemm-gpu).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.embcompress-installed
TORCH := torch==2.13.0
TORCHREC_DEPS := fbgemm-gpu-cpu==1.8.0 tensordict==0.15.3 torchmetrics==1.0.3 pyre-extensions iopath

.PHONY: install bench test clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet $(TORCH) $(TORCHREC_DEPS)
	$(BIN)/python -m pip install --quiet --no-deps torchrec==1.8.0
	$(BIN)/python -m pip install --quiet $(TORCH) -e '.[test]'
	touch $(STAMP)

bench: $(STAMP)
	$(BIN)/embcompress bench

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info
