"""The packages install under the `loraledger.` namespace and nothing of ours shadows another top-level name."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP_FOLDERS = ("node", "inference", "kernels", "proto")


def test_top_level_names_do_not_resolve_into_the_checkout(tmp_path: Path) -> None:
    """From a directory outside the checkout, `import kernels` (Hugging Face's), `import proto` (proto-plus's)
    and `import node` either fail or find another distribution, never one of our folders; the namespaced names
    resolve to the checkout's folders."""
    probe = (
        "import importlib.util, json\n"
        f"names = {list(TOP_FOLDERS)!r} + ['loraledger.' + n for n in {list(TOP_FOLDERS)!r}]\n"
        "out = {}\n"
        "for n in names:\n"
        "    spec = importlib.util.find_spec(n)\n"
        "    out[n] = None if spec is None else (spec.origin or list(spec.submodule_search_locations or []))\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=True)
    import json

    found = json.loads(done.stdout)
    for name in TOP_FOLDERS:
        where = found[name]
        assert where is None or str(ROOT) not in str(where), f"`import {name}` resolves into the checkout: {where}"
        ours = found[f"loraledger.{name}"]
        assert ours is not None and str(ROOT / name) in str(ours), f"loraledger.{name} resolves to {ours}"


def test_pyproject_lists_every_package_folder() -> None:
    """Every folder with an __init__.py under the four top-level folders is an installed package (the explicit
    `packages` list in pyproject.toml), and every listed package exists."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {
        "loraledger." + ".".join(init.parent.relative_to(ROOT).parts)
        for top in TOP_FOLDERS for init in (ROOT / top).rglob("__init__.py")
    }
    assert listed == on_disk, f"missing from pyproject: {sorted(on_disk - listed)}; stale: {sorted(listed - on_disk)}"
    assert config["package-dir"] == {f"loraledger.{t}": t for t in TOP_FOLDERS}
