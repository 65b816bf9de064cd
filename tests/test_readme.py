"""The README's Python examples run as written (with a small synthetic loader)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from secateurs import data

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples may write files
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    bundle = data.synthetic(n_train=256, n_test=64)
    loader = bundle.loaders(64)[0]
    namespace: dict[str, object] = {"loader": loader, "calib_loader": loader}
    setup = (
        "loss_fn = torch.nn.functional.cross_entropy\n"
        "optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)\n"
    )
    first, *rest = blocks
    # the first block defines the model; the optimizer is created right after it
    cut = first.index("# or prune gradually")
    head, tail = first[:cut], first[cut:]
    exec(head, namespace)
    exec(setup, namespace)
    exec(tail, namespace)
    for block in rest:
        if block.startswith("# as one program"):  # a whole program on a fresh model
            namespace["model"] = namespace["build_model"]("lenet-5")  # type: ignore[operator]
            exec(block, namespace)
            continue
        # otherwise each line is an alternative plan for a fresh model
        for line in filter(None, block.splitlines()):
            namespace["model"] = namespace["build_model"]("lenet-5")  # type: ignore[operator]
            exec(line, namespace)
    model = namespace["model"]
    assert isinstance(model, torch.nn.Module)
