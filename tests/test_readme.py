"""The README's snippet that uses MLA with one's own encoders runs as printed."""
import re

import torch

from conftest import ROOT


def test_readme_mla_snippet_runs():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- mla-snippet -->\s*```python\n(.*?)```", text, re.S)
    assert m, "README has no MLA snippet"
    code = m.group(1)
    assert len(code.strip().splitlines()) <= 20
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    model, fused = scope["model"], scope["fused"]
    assert fused.shape == (16, 5)
    assert not torch.equal(model.P, torch.eye(model.dim))        # the projection ran
