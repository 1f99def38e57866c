# Common commands. Each target works from a fresh clone (scripts/install.sh sets up .venv).
VENV ?= .venv
PY := $(if $(VIRTUAL_ENV),python,$(VENV)/bin/python)

.PHONY: install dev demo test lint format method-doc

install:
	scripts/install.sh

dev:
	scripts/install.sh dev

demo:
	scripts/demo.sh

test:
	scripts/test.sh

lint:
	$(PY) -m ruff check .

format:
	$(PY) -m ruff format .

method-doc:  ## regenerate docs/METHOD.md (CPU, about a minute)
	$(PY) bench/method/init_effect.py
