# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch/torchvision are the releases on this machine's disk (a CUDA build that also runs on CPU);
# pinning them first keeps pip from fetching a different multi-GB build.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  ?= torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test test-fast bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -c "import torch, torchvision, fastai, typer, safetensors, sklearn; print('installed: torch', torch.__version__, 'fastai', fastai.__version__)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/cxr-fastai demo

# two pytest-xdist workers, a test file each at a time (module fixtures are built once); one thread each
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -ra --durations=25 -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(BIN)/python -m pytest -ra -m "not slow"

clean:
	rm -rf $(VENV) demo-out .pytest_cache
