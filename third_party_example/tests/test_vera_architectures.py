"""VeRA on lora-lite's 13 tiny architectures (GPT-2's Conv1D, BERT, T5, fused projections...),
default targets and block 0, with lora-lite's own cell checks (``lora_lite.arch_matrix``)."""
import pytest

from lora_lite.arch_matrix import cell_problems, run_cell
from lora_lite.tiny_models import ARCHS


@pytest.mark.parametrize("layers", [None, (0,)], ids=["all", "block0"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_vera_cell(arch, layers):
    figures = run_cell(arch, "vera", layers, knobs={"r": 4})
    assert not cell_problems(figures, layers), figures
