# Set-up and the main jobs. `make demo` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of this torch lies on local disk here; on a CUDA workstation the same pin
# brings the CUDA build. pyproject.toml only declares ranges.
TORCH := torch==2.13.0
RUN ?= runs/demo
BUNDLE ?= bundles/demo
ENDPOINT ?= tcp://127.0.0.1:5555

.PHONY: demo test test-fast lint install bench clean

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[cpu,train,dev,sweep,lsl]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/swapvae train --data simulated --out $(RUN) --seed 0 --force
	$(VENV)/bin/swapvae evaluate $(RUN)
	$(VENV)/bin/swapvae export $(RUN) --out $(BUNDLE) --force
	@$(VENV)/bin/swapvae serve $(BUNDLE) --bind $(ENDPOINT) & pid=$$!; \
	  $(VENV)/bin/swapvae replay $(BUNDLE) --data simulated --endpoint $(ENDPOINT); rc=$$?; \
	  kill $$pid; wait $$pid; exit $$rc

test: install lint
	$(PY) -m pytest -q

# The inner loop: everything but the slow subprocess suites (rig venv, soak, ASan fuzz, linters).
test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/reach_accuracy.py
	$(PY) benchmarks/engine_latency.py
	$(PY) benchmarks/latency.py

clean:
	rm -rf $(VENV) runs bundles results
