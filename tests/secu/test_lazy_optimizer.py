"""The optimizer is built on first use: a method loaded only to assign (an inference actor) never builds
one, so it never imports ``torch._dynamo`` (torch.optim's first constructor does, about a second of an
actor's start); a training run steps the same parameters either way."""

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


def test_lazy_optimizer_holds_the_networks_parameters_once() -> None:
    for name in ("secu", "propos", "drc"):
        exp = recipe(f"fashion-mnist-cpu-{name}") if name != "secu" else recipe("fashion-mnist-cpu")
        method = build_method(exp, 4)
        optimizer = method.optimizer
        assert method.optimizer is optimizer, name
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        trainable = {id(p) for p in method.base.parameters() if p.requires_grad}
        assert held and held <= trainable, name
        state = method.state_dict()
        again = build_method(exp, 4)
        again.load_state_dict(state)
        assert [g["lr"] for g in again.optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups], name


def test_pfca_optimizers_are_built_on_first_use() -> None:
    method = build_method(recipe("fashion-mnist-cpu-pfca"), 4)
    assert "optimizers" not in vars(method)
    optimizers = method.optimizers
    assert set(optimizers) == {"generator", "critic", "classifier"} and method.optimizers is optimizers
    assert all(isinstance(o, torch.optim.Adam) for o in optimizers.values())
