"""The docs, README and --help say what the registries hold: every model and dataset by name,
each model's parameter count and bit-change tensor, and the "Study your own model" example is the
file it shows and builds."""

from __future__ import annotations

import re

import torch

from helpers import REPO, run_cli
from nondet_hpc.registry.datasets import DATASETS
from nondet_hpc.registry.models import MODELS


def test_models_md_has_every_model_with_its_count_and_bit_change_tensor():
    text = (REPO / "docs" / "models.md").read_text()
    for m in MODELS.values():
        row = next((line for line in text.splitlines() if line.startswith(f"| `{m.name}` | {m.family} |")), None)
        assert row is not None, m.name
        assert (f"{m.params:,} (" in row) if m.params else "yours" in row
        assert f"`{m.bitflip}`" in row if m.bitflip else "source.bitflip_param" in row
    for d in DATASETS:
        assert f"| `{d}`" in text, d
    assert "Out of scope: ImageNet at full scale" in text


def test_readme_and_help_list_every_model_and_dataset():
    readme = (REPO / "README.md").read_text()
    for name in [*MODELS, *DATASETS]:
        assert f"`{name}`" in readme, name
    out = run_cli(["-m", "nondet_hpc", "--help"]).stdout
    groups = dict(re.findall(r"^(data|model): (.*)$", out, flags=re.M))
    assert sorted(groups["model"].split(", ")) == sorted(MODELS)
    assert sorted(groups["data"].split(", ")) == sorted(DATASETS)
    assert "docs/models.md" in out and "docs/own_model.md" in out


def test_the_own_model_page_shows_the_example_file_and_it_builds():
    from nondet_hpc.run.zoo import build_custom, check_output

    example = (REPO / "docs" / "examples" / "my_models.py").read_text()
    page = (REPO / "docs" / "own_model.md").read_text()
    assert f"```python\n{example}```" in page
    import sys

    sys.path.insert(0, str(REPO / "docs" / "examples"))
    try:
        model = build_custom("my_models:small_cnn", {"width": 16}, torch.Generator().manual_seed(1))
        check_output(model, (1, 8, 8), 10)
    finally:
        sys.path.remove(str(REPO / "docs" / "examples"))
        sys.modules.pop("my_models", None)
    assert sum(p.numel() for p in model.parameters()) == 16 * 9 + 32 + 32 * 16 * 9 + 64 + 32 * 10 + 10
