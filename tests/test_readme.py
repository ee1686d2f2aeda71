"""The README's snippet that uses MLA with one's own encoders runs as printed: in this process, in a fresh
folder next to a copy of the repository (as a user runs it), and with section 1a copied out under its imports."""
import os
import re
import shutil
import subprocess
import sys

import torch

from conftest import ROOT


def snippet():
    m = re.search(r"<!-- mla-snippet -->\s*```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert m, "README has no MLA snippet"
    return m.group(1)


def test_readme_mla_snippet_runs(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))          # the snippet's sys.path line is undone
    code = snippet()
    assert len(code.strip().splitlines()) <= 20
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    model, fused = scope["model"], scope["fused"]
    assert fused.shape == (16, 5)
    assert not torch.equal(model.P, torch.eye(model.dim))        # the projection ran


def test_readme_mla_snippet_runs_in_a_fresh_folder(tmp_path):
    # the user's folder holds the repository as mla/ (only common.py is needed) and nothing on PYTHONPATH
    (tmp_path / "mla").mkdir()
    shutil.copy(ROOT / "common.py", tmp_path / "mla" / "common.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    check = "\nprint(tuple(fused.shape), bool((model.P - torch.eye(32)).abs().max() > 0))"
    out = subprocess.run([sys.executable, "-c", snippet() + check], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1] == "(16, 5) True"


def test_readme_mla_block_copied_out_needs_only_its_three_imports(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    text = (ROOT / "common.py").read_text()
    block = text[text.index("# ======== 1. Methods.  1a."):text.index("# ======== 1b.")]
    scope = {}
    exec("import torch\nimport torch.nn as nn\nimport torch.nn.functional as F\n" + block, scope)
    code = snippet().replace("from common import MLA", "")
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["fused"].shape == (16, 5) and scope["MLA"] is not __import__("common").MLA
