"""The algorithm core must run without Ray: no module in secu/ may import it."""

import ast
from pathlib import Path

SECU = Path(__file__).resolve().parents[2] / "secu"


def test_secu_never_imports_ray() -> None:
    files = sorted(SECU.rglob("*.py"))
    assert len(files) >= 5  # the walk really found the package
    offenders = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path.name}: {n}" for n in names if n == "ray" or n.startswith("ray.")]
    assert offenders == []
