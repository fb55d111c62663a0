.PHONY: test test-slow demo install lint

# Runs ruff, mypy and the default pytest suite; installs what it needs on a fresh machine.
test:
	bash scripts/test.sh

# The long checks kept out of the default run.
test-slow:
	bash scripts/test.sh -m slow

# End to end on real data (Fashion-MNIST), local Ray, local storage.
demo:
	bash scripts/demo.sh

install:
	python3 -m venv .venv && .venv/bin/pip install -e .
