# The two commands the README opens with: `make demo` and `make test`.
.PHONY: setup demo test lint bench lock

setup:
	bash scripts/setup.sh

demo: setup
	. .venv/bin/activate && PYTHONUNBUFFERED=1 python scripts/demo.py

test: setup
	. .venv/bin/activate && ruff check . && mypy && PYTHONUNBUFFERED=1 python -m pytest -v --durations=15

lint: setup
	. .venv/bin/activate && ruff check . && mypy

bench: setup
	. .venv/bin/activate && python bench/train_bench.py && python bench/serve_bench.py

lock:
	bash scripts/lock.sh
