# seqbook: one virtual environment (.venv), created on first use by every target.
#   make book     execute every chapter and build the site into _build/html
#   make test     every test: unit, kernel, notebooks (nbval), grading, the site in a browser
#   make lab      JupyterLab in the same environment
#   make release  the student release of the exercises, into release/
#   make grade SUBMISSIONS=dir   grade a folder of submitted notebooks into gradebook/
#   make bench    the GPU benchmark suite (needs CUDA)
#   make compile-check   compile every Triton kernel for sm_90 (Hopper), no GPU needed

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch installs from this machine's disk in seconds; a range would
# pull a multi-GB CUDA build. For a GPU, install a CUDA build of torch into .venv
# first (README, "On a GPU"): an importable torch is kept as it is.
TORCH  ?= torch==2.13.0
SUBMISSIONS ?= submissions

.PHONY: all book test lab release grade bench compile-check browser clean

all: test

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[book,test]"
	@touch $@

book: $(VENV)/.installed
	$(VENV)/bin/jupyter-book build . --config book.yml --toc toc.yml --warningiserror --keep-going

# Headless Chromium for the site test (Debian's package; installed when missing).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }

test: $(VENV)/.installed browser
	$(PY) -m pytest

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab chapters

release: $(VENV)/.installed
	$(PY) -m seqbook.grading release chapters --out release

grade: $(VENV)/.installed
	$(PY) -m seqbook.grading grade $(SUBMISSIONS) --out gradebook

bench: $(VENV)/.installed
	$(PY) -m benchmarks.run

compile-check: $(VENV)/.installed
	$(PY) -m benchmarks.compile_check

clean:
	rm -rf _build release gradebook .pytest_cache
