# Two commands from a fresh clone: `make demo` and `make test`.
# Both create .venv when missing and install the project with the pinned, known-good
# versions of constraints.txt (CPU torch); a second run installs nothing. Editing
# csrc/ (or the packaging files) re-installs, rebuilding the C++ extensions.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mirror-installed

.PHONY: demo test install

install: $(STAMP)

$(STAMP): pyproject.toml setup.py constraints.txt $(wildcard csrc/*.cpp csrc/*.h)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	rm -f mirror_core/_*.so  # an editable re-install may keep a stale in-place build
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/mirror demo --workdir demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=40
