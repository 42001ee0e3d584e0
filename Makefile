# Development and CI entry points. CI runs `make test` through .ci/run.
#
#   make venv    create .venv (if missing) and install the pinned stack plus vitkernels[test], editable
#   make build   rebuild the compiled extension vitkernels._C in place
#   make test    the test suite; the extension must be built (VITKERNELS_REQUIRE_EXTENSION=1)
#   make demo    python -m vitkernels demo
#   make bench   the pytest-benchmark suite in bench/
#   make clean   build outputs and caches (not .venv; `make distclean` removes it too)

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest -p no:cacheprovider

# The exact versions CI runs; pyproject.toml states only loose minimums. Installed first, with the
# build tools, so that `pip install --no-build-isolation -e .[test]` builds the extension against them.
# The model zoos are pinned too: the reference tests mirror their internals exactly.
PINS := torch==2.14.1 torchvision==0.29.1 triton==3.8.0 timm==1.0.31 transformers==5.24.0
BUILD_TOOLS := setuptools ninja

# The stamp's name carries the pins, so changing them reinstalls; so does editing setup.py or
# pyproject.toml.
STAMP := $(VENV)/.installed-$(shell echo '$(PINS)' | cksum | cut -d' ' -f1)

.PHONY: venv build ext ext-status test demo bench clean distclean

venv: $(STAMP)

$(STAMP): setup.py pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install $(PINS) $(BUILD_TOOLS)
	$(PY) -m pip install --no-build-isolation -e '.[test]'
	@rm -f $(VENV)/.installed-*
	@$(MAKE) --no-print-directory ext-status
	@touch $@

# Rebuilds vitkernels._C in place (ninja: only what changed since the last `make build`).
build: venv
	$(PY) setup.py build_ext --inplace
	@$(MAKE) --no-print-directory ext-status

# Rebuilds only when a file under csrc/ (or setup.py) is newer than the built extension.
ext: venv
	@so=$$(ls vitkernels/_C*.so 2>/dev/null | head -n 1); \
	if [ -z "$$so" ] || [ -n "$$(find csrc setup.py -type f -newer "$$so" | head -n 1)" ]; then \
		$(MAKE) --no-print-directory build; \
	fi

ext-status:
	@$(PY) -c "from vitkernels import _ext; r = _ext.unavailable_reason(); \
	print('vitkernels._C:', ('NOT BUILT: ' + r) if r else _ext.build_info())"

test: venv ext
	VITKERNELS_REQUIRE_EXTENSION=1 $(PYTEST) tests -q

demo: venv ext
	$(PY) -m vitkernels demo

bench: venv ext
	$(PYTEST) bench -q

clean:
	rm -rf build dist *.egg-info vitkernels/_C*.so .pytest_cache .benchmarks .hypothesis
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
