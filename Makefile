# TexForce for ComfyUI: development targets.
#   make env                      build (once) the cached ComfyUI test environment
#   make test [PYTEST_ARGS=...]   run the test suite with that environment's python
#   make demo                     run scripts/demo.py with that environment's python
# The environment lives outside the repository, in $${TEXFORCE_CACHE:-~/.cache/texforce}.
# PY=/path/to/python overrides the interpreter used by `test` and `demo`.

PYTHON3 ?= python3
HOST := $(PYTHON3) scripts/comfy_host.py
PY ?=
PYTEST_ARGS ?=

# Resolve the venv python at run time (building the env if needed) and fail if that fails.
RESOLVE_PY = set -e; py='$(PY)'; if [ -z "$$py" ]; then py="$$($(HOST) python)"; fi

.PHONY: env test demo

env:
	$(HOST) ensure

test: env
	@$(RESOLVE_PY); echo "$$py -m pytest -q tests $(PYTEST_ARGS)"; "$$py" -m pytest -q tests $(PYTEST_ARGS)

demo: env
	@$(RESOLVE_PY); echo "$$py scripts/demo.py"; "$$py" scripts/demo.py
