# make test : create/reuse .venv, install pinned requirements, run the pytest suite (CPU, minutes)
# make demo : create/reuse .venv, build the embedded dataset, train both stages, sample, evaluate, plot
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo install clean-demo

$(STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) demo.py

clean-demo:
	rm -rf runs/demo data/embedded_64 runs/demo128 data/embedded_128
