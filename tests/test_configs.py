"""Every shipped config file sets only keys its stage script defines, with values of the right type."""

import ast
import glob
import os

import pytest

from conftest import ROOT

SCRIPT_OF = {"pretrain": "pretrain.py", "gpt2": "pretrain.py", "llama": "pretrain.py", "moe": "pretrain.py",
             "sft": "sft.py", "reward": "reward.py", "dpo": "dpo.py", "grpo": "grpo.py"}


def script_defaults(script):
    """Top-level assignments of literal values before `configure(` in a stage script."""
    tree = ast.parse(open(os.path.join(ROOT, script)).read())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
        if isinstance(node, ast.Assign) and "configure(" in ast.unparse(node.value):
            break
    return out


CONFIGS = sorted(p for p in glob.glob(os.path.join(ROOT, "configs", "*.py")) if not p.endswith("__init__.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_keys_exist_in_script(path):
    from configs import configure
    prefix = os.path.basename(path).split("_")[0].removesuffix(".py")
    assert prefix in SCRIPT_OF, f"{path}: name it after its stage ({', '.join(SCRIPT_OF)}_...)"
    defaults = script_defaults(SCRIPT_OF[prefix])
    assert defaults, f"no config globals found in {SCRIPT_OF[prefix]}"
    configure(dict(defaults), [path])  # raises SystemExit with a clear message on an unknown key or a bad type
