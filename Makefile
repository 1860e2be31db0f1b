# Two commands from a fresh clone: `make demo` and `make test`.
# Both create .venv when missing and install the project with the pinned, known-good
# versions of constraints.txt (CPU torch); a second run installs nothing.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mirror-installed

.PHONY: demo test install clean-ext

install: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt csrc/topk_readout.cpp csrc/readout_row.h
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mirror demo --workdir demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q

# After editing csrc/: rebuild the in-place extension from scratch.
clean-ext:
	rm -f _mirror_readout*.so mirror_core/_readout*.so
	rm -f $(STAMP)
