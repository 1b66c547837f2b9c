"""VeRA on lora-lite's 21 tiny architectures (GPT-2's Conv1D, BERT, T5, fused projections...),
default targets and block 0, with lora-lite's own cell checks (``lora_lite.testing.arch_matrix``)."""
import pytest

from lora_lite.testing.arch_matrix import cell_problems, run_cell
from lora_lite.testing.tiny_models import ARCHS


@pytest.mark.parametrize("layers", [None, (0,)], ids=["all", "block0"])
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_vera_cell(arch, layers):
    figures = run_cell(arch, "vera", layers, knobs={"r": 4})
    assert not cell_problems(figures, layers), figures


def test_vera_refuses_an_embedding_or_a_conv_in_one_line():
    """VeRA declares no layer_kinds: lora-lite's default, linear layers only; the others are
    refused naming the layer and its kind (never skipped)."""
    import torch
    from torch import nn

    import lora_lite as ll
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8))
    conv = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(16, 8))
    for m, name, kind in ((model, "0", "embedding"), (conv, "0", "conv")):
        with pytest.raises(ll.AttachError) as e:
            ll.attach(m, ll.config("vera", r=4, target_names=[f"^{name}$"]))
        assert "\n" not in str(e.value) and f"cannot adapt {name} (" in str(e.value)
        assert f"layer kind {kind!r}" in str(e.value) and ll.attached(m) is None
    ll.attach(model, ll.config("vera", r=4))  # the default targets: the Linear, as before
    assert model(torch.tensor([[1, 2]])).shape == (1, 2, 8)
