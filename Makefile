# Two entry points (see README): `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.lm_plugin-installed

.PHONY: demo data test lint docs bench clean

# Fashion-MNIST for the demo comes from Debian's package when it can be installed (root or passwordless sudo,
# and LM_PLUGIN_NO_APT unset); otherwise the demo falls back to torchvision's download, then to a clear message.
FM_DEB := /usr/share/datasets/fashion-mnist
APT_INSTALL := apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	(apt-get update -q >/dev/null 2>&1 && apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[nni,onnx,docs,dev]"
	touch $(STAMP)

demo: $(STAMP) data
	$(PY) -m lm_plugin demo

data:
	@if [ ! -d $(FM_DEB) ] && [ -z "$$LM_PLUGIN_NO_APT" ] && command -v apt-get >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then echo "installing dataset-fashion-mnist (apt)"; ($(APT_INSTALL)) || true; \
	  elif sudo -n true 2>/dev/null; then echo "installing dataset-fashion-mnist (sudo apt)"; \
	    (sudo sh -c '$(APT_INSTALL)') || true; fi; \
	fi

# One pytest worker per core of the CI machine (2); most tests run one intra-op thread, so a single process would
# leave a core idle. TEST_WORKERS=0 runs in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist worksteal
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet --site-dir build/site

lint: $(STAMP)
	$(PY) -m ruff check lm_plugin tests examples benchmarks

docs: $(STAMP)
	$(PY) -m mkdocs serve

clean:
	rm -rf build site .pytest_cache .lm_cache lm_plugin_demo
