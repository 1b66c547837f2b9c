"""cost-report picks up OFT/BOFT through the shared contract (no table rows in the CLI): their
PEFT equivalent from peft_config, their analytic MACs from added_macs, their notes."""
import lora_lite as ll
from lora_lite.testing import tiny_llama
from lora_lite_cli import cost


def test_peft_equivalent_and_macs_come_from_the_variant():
    import peft
    for name, kind in [("oft", peft.OFTConfig), ("boft", peft.BOFTConfig)]:
        V, cfg = ll.get_variant(name), ll.config(name, target_names=[r"q_proj$"])
        config, init = cost.peft_spec(V, cfg, ["model.layers.0.self_attn.q_proj"])
        assert isinstance(config, kind) and init is None
        targets = ll.find_targets(tiny_llama(), cfg)
        per_token, rule = cost.analytic_macs(V, targets, cfg, tokens_per_call=10)
        tok, call = V.added_macs(targets[0], cfg)
        assert rule == "variant" and per_token == len(targets) * (tok + call / 10) > 0
    assert cost.peft_spec(ll.get_variant("lora_xs"), ll.config("lora_xs"), []) is None
    assert "d_in×d_in" in cost.variant_note(ll.get_variant("boft"), "peft")


def test_train_defaults_knobs_are_typed_values():
    """BOFT's train_defaults knobs (ints) go through the CLI's config builder as they are."""
    from lora_lite_cli.app import build_config
    cfg = build_config("boft", sets=dict(ll.get_variant("boft").train_defaults["knobs"]))
    assert (cfg.block_size, cfg.n_butterfly_factor) == (4, 2)
    assert build_config("boft", sets={"n_butterfly_factor": "3"}).n_butterfly_factor == 3
