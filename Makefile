# Two commands: `make demo` and `make test`. Each creates .venv and installs the pinned
# packages the first time (or when requirements.txt / pyproject.toml change).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= outputs/demo

.PHONY: install test test-all demo clean-demo browser

$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	# DeepSpeed compiles its CUDA ops lazily on the cluster; DS_BUILD_OPS=0 keeps the
	# install pure Python, and --no-build-isolation lets its setup see the pinned torch.
	DS_BUILD_OPS=0 $(PY) -m pip install --no-build-isolation deepspeed==0.19.8
	# facexlib (fallback face detector and face parser): its declared dependencies would
	# add opencv-python beside the headless build; the parts the kit uses need none of them.
	$(PY) -m pip install --no-deps facexlib==0.3.0
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

# Headless Chromium for the tests that open the preprocess report page (Debian's package;
# needs root and the Debian mirrors). Without it those tests skip, saying so.
browser:
	command -v chromium >/dev/null || command -v chromium-browser >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium)

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ""

demo: $(STAMP)
	$(PY) -m echovideo.demo --out $(DEMO_DIR)

clean-demo:
	rm -rf $(DEMO_DIR)
