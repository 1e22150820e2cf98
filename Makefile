# TexForce for ComfyUI: development targets.
#   make env                      build (once) the cached ComfyUI test environment
#   make test [PYTEST_ARGS=...]   run the test suite with that environment's python
#   make demo [ARGS=...]          run scripts/demo.py with that environment's python (ARGS="--epochs 5 --port 8190")
#   make demo-stop                stop the ComfyUI server the demo left running
# The environment lives outside the repository, in $${TEXFORCE_CACHE:-~/.cache/texforce}.
# PY=/path/to/python overrides the interpreter used by `test` and `demo`.

PYTHON3 ?= python3
HOST := $(PYTHON3) scripts/comfy_host.py
PY ?=
PYTEST_ARGS ?=
ARGS ?=
# One line per test file with its progress, the reason of every skip, failure and error at the end, and the
# slowest tests.
PYTEST_OPTS := -rfEs --durations=15 --durations-min=1.0
CHROMIUM := $${TEXFORCE_CHROMIUM:-/usr/bin/chromium}

# Resolve the venv python at run time (building the env if needed) and fail if that fails.
RESOLVE_PY = set -e; py='$(PY)'; if [ -z "$$py" ]; then py="$$($(HOST) python)"; fi

.PHONY: env test demo demo-stop

env:
	$(HOST) ensure

test: env
	@$(RESOLVE_PY); \
	if [ ! -x "$(CHROMIUM)" ]; then \
	  echo "NOTE: $(CHROMIUM) not found: the browser tests (tests/test_web_browser.py) will be skipped;" \
	       "install Debian's chromium to run them (sudo apt-get install chromium)"; \
	fi; \
	echo "$$py -m pytest tests $(PYTEST_OPTS) $(PYTEST_ARGS)"; "$$py" -m pytest tests $(PYTEST_OPTS) $(PYTEST_ARGS)

demo: env
	@$(RESOLVE_PY); echo "$$py scripts/demo.py $(ARGS)"; "$$py" scripts/demo.py $(ARGS)

demo-stop:
	@$(PYTHON3) scripts/demo.py --stop
