.PHONY: test test-slow demo gpu-check install lint

# Runs ruff, mypy and the default pytest suite; installs what it needs on a fresh machine.
test:
	bash scripts/test.sh

# The long checks kept out of the default run.
test-slow:
	bash scripts/test.sh -m slow

# End to end on real data (Fashion-MNIST), local Ray, local storage.
demo:
	bash scripts/demo.sh

# On a machine with a CUDA GPU: a short fashion-mnist-resnet18 training (NCCL, mixed precision, views on the
# device), the 224 px stream with views on the device and an inference pass, in under 8 minutes; writes
# benchmarks/results/gpu_check.json. Exits 3 with a message where torch sees no GPU. Options: GPU_CHECK_ARGS.
gpu-check:
	bash -c 'source scripts/venv.sh && exec "$$VENV/bin/python" -m benchmarks.gpu_check "$$@"' gpu-check $(GPU_CHECK_ARGS)

install:
	python3 -m venv .venv && .venv/bin/pip install -e .
