"""The optimizer is built on first use: a method loaded only to assign (an inference actor) never builds
one, so it never imports ``torch._dynamo`` (torch.optim's first constructor does: about 2 s of CPU in a
fresh process); a training run steps the same parameters either way."""

import subprocess
import sys
import textwrap

import torch

from secu.methods import build_method
from secu.recipes import recipe


def test_assign_only_load_imports_no_dynamo() -> None:
    code = textwrap.dedent("""
        import sys, torch
        from secu.methods import build_method
        from secu.recipes import recipe
        exp = recipe("fashion-mnist-cpu")
        method = build_method(exp, 1)
        method.load_state_dict({"network": method.base.state_dict(), "cluster_state": method._cluster_state()})
        s = exp.augment.image_size
        method.eval().assign(torch.rand(2, exp.augment.channels, s, s))
        assert "torch._dynamo" not in sys.modules, "an assign-only load imported torch._dynamo"
        method.optimizer
        assert "torch._dynamo" in sys.modules, "the check above could not fail: no optimizer imports dynamo"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


RECIPES = {"secu": "fashion-mnist-cpu", "propos": "fashion-mnist-cpu-propos", "drc": "fashion-mnist-cpu-drc"}


def test_lazy_optimizer_holds_the_networks_parameters_and_round_trips() -> None:
    for name, recipe_name in RECIPES.items():
        exp = recipe(recipe_name)
        method = build_method(exp, 4)
        assert "optimizer" not in vars(method), name
        optimizer = method.optimizer
        assert method.optimizer is optimizer, name
        held = [p for group in optimizer.param_groups for p in group["params"]]
        trainable = {id(p) for p in method.base.parameters() if p.requires_grad}
        assert held and {id(p) for p in held} <= trainable, name
        for p in held:  # one step, so the optimizer has momentum buffers to carry
            p.grad = torch.ones_like(p)
        optimizer.step()
        again = build_method(exp, 4)
        again.load_state_dict(method.state_dict())
        loaded = again.optimizer.state_dict()["state"]
        saved = optimizer.state_dict()["state"]
        assert loaded.keys() == saved.keys() and len(saved) == len(held), name
        for key, buffers in saved.items():
            for buffer_name, value in buffers.items():
                assert torch.equal(loaded[key][buffer_name], value), (name, key, buffer_name)


def test_pfca_optimizers_are_built_on_first_use() -> None:
    method = build_method(recipe("fashion-mnist-cpu-pfca"), 4)
    assert "optimizers" not in vars(method)
    optimizers = method.optimizers
    assert set(optimizers) == {"generator", "critic", "classifier"} and method.optimizers is optimizers
    assert all(isinstance(o, torch.optim.Adam) for o in optimizers.values())
