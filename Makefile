# Everything a fresh machine needs: Python 3.10+ and make.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python

.PHONY: test demo venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest

demo: $(VENV)/.installed
	@echo "make demo: the training pipeline is not built yet (see the training issue)." >&2
	@exit 1

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
