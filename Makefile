# seqbook: one virtual environment (.venv), created on first use by every target but test-gpu.
#   make book     execute every chapter and build the site into _build/html
#   make test     every test: unit, kernel, notebooks (nbval), grading, the site in a browser
#   make test-gpu every kernel test compiled on a CUDA GPU, with the Python that holds CUDA torch (no .venv)
#   make lab      JupyterLab in the same environment
#   make release  the student release of the exercises, into release/
#   make grade SUBMISSIONS=dir   grade a folder of submitted notebooks into gradebook/
#   make bench    the GPU benchmark suite (needs CUDA)
#   make compile-check   compile every Triton kernel for sm_90 (Hopper), no GPU needed
#   make clean    remove the built site, its execution cache, release/ and gradebook/
# A plain `make` prints this list.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU wheel of torch installs from this machine's disk in seconds; a range would
# pull a multi-GB CUDA build. For a GPU, install a CUDA build of torch into .venv
# first (README, "On a GPU"): an importable torch is kept as it is.
TORCH  ?= torch==2.13.0
SUBMISSIONS ?= submissions
# The book's table of contents; `make book TOC=my_toc.yml` builds only the files another toc lists.
TOC    ?= toc.yml
# One thread per PyTorch process. The notebooks run many small operations: with two threads
# each, the kernels of `make book` and of pytest's two workers spin-wait for each other's
# cores, and on a busy 2-core machine a loop of chapter 1 took 43 s instead of 3 s.
# Override for a large idle machine: `make book OMP_NUM_THREADS=8`.
OMP_NUM_THREADS ?= 1
export OMP_NUM_THREADS
# test-gpu: the Python of the GPU machine (with CUDA torch and Triton), and pytest's workers there.
GPU_PYTHON  ?= python3
GPU_WORKERS ?= 4

.PHONY: help book test test-gpu lab release grade bench compile-check browser clean

help:
	@sed -n '2,11s/^# \{0,1\}//p' Makefile

# pip prints what it collects and installs (the first install takes a few minutes).
$(VENV)/.installed: pyproject.toml
	@echo "[setup] creating $(VENV): torch, Jupyter Book, JupyterLab, pytest and seqbook itself (editable)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e ".[book,test]"
	@touch $@
	@echo "[setup] $(VENV) is ready"

# _ext/build_book.py runs jupyter-book (warnings as errors, stops at the first failed cell),
# prints each notebook's execution time, and fails on a page that shows a traceback.
book: $(VENV)/.installed
	$(PY) _ext/build_book.py --toc $(TOC)

# Headless Chromium for the site test (Debian's package; installed when missing).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; }

test: $(VENV)/.installed browser
	$(PY) -m pytest

# No virtual environment: the GPU machine's Python already holds a CUDA torch and Triton, and
# seqbook is imported from this checkout. nbval, the site, grading (which runs notebooks) and
# the environment-file test need the book's Jupyter stack: `make test` runs them.
test-gpu:
	@$(GPU_PYTHON) -c "import sys, torch; torch.cuda.is_available() or sys.exit('make test-gpu: no CUDA device for this Python (torch ' + torch.__version__ + ')')"
	@PYTHONPATH="$(CURDIR)" $(GPU_PYTHON) -c "import torch, triton, seqbook.backend as b; x = torch.ones(1, device='cuda'); print('[test-gpu]', torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton', triton.__version__, '| backend auto ->', b.resolve('auto', x), '| interpreter:', b.interpreting())"
	PYTHONPATH="$(CURDIR)" $(GPU_PYTHON) -m pytest -o addopts="" -p no:cacheprovider -ra --strict-markers \
	  -n $(GPU_WORKERS) --dist loadfile tests --ignore=tests/grading \
	  --ignore=tests/test_site.py --ignore=tests/test_notebooks.py --ignore=tests/test_grading.py \
	  --ignore=tests/test_environment.py

# Jupyter refuses to start as root unless told it may (containers often run as root).
lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab chapters $(if $(filter 0,$(shell id -u)),--allow-root)

release: $(VENV)/.installed
	$(PY) -m seqbook.grading release chapters --out release

grade: $(VENV)/.installed
	$(PY) -m seqbook.grading grade $(SUBMISSIONS) --out gradebook

bench: $(VENV)/.installed
	$(PY) -m benchmarks.run

compile-check: $(VENV)/.installed
	$(PY) -m benchmarks.compile_check

# _build holds the site and the notebooks' execution cache (_build/.jupyter_cache).
clean:
	rm -rf _build release gradebook .pytest_cache
