"""Print lora-lite-vera's measured figures: parity with PEFT's VeRA and the design.md §4
invariants on fp32, bitsandbytes 4bit (nf4) and 8bit bases (tiny random Llama, r=4, CPU).

    python figures.py          # after pip install -e ".[test]" (or from lora-lite's repo root:
                               # .venv/bin/python third_party_example/figures.py)
"""
import pathlib
import sys
import warnings

import torch

import lora_lite as ll
from lora_lite import plugins, testing

warnings.filterwarnings("ignore")
PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R = 4


def ensure_plugin():
    """Use the installed plugin; if it is not installed, register the source tree's in-process."""
    if "vera" in ll.variants():
        return "entry point"
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent / "src"))
    import lora_lite_vera.plugin
    plugins.register_plugin(lora_lite_vera.plugin, "vera", "lora-lite-vera", "0.1.0")
    return "source tree, registered in-process (not installed)"


def peft_parity(batch):
    from peft import VeraConfig, get_peft_model
    peft_model = get_peft_model(testing.tiny_llama(), VeraConfig(
        r=R, target_modules=PROJ, projection_prng_key=0, d_initial=0.1))
    base = testing.logits(testing.tiny_llama(), batch)
    identity = (testing.logits(peft_model, batch) - base).abs().max().item()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "vera_lambda" in n:
                p.normal_(0.0, 1.0, generator=g)
    modules = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules()
               if hasattr(m, "vera_lambda_d")}
    model = testing.tiny_llama()
    state = ll.attach(model, ll.config("vera", r=R, target_names=[f"{n}$" for n in PROJ]))
    with torch.no_grad():
        for t in state.targets:
            pm = modules[t.name]
            t.layer.register_buffer("lora_vera_A", pm.vera_A["default"][:, :t.d_in].clone(),
                                    persistent=False)
            t.layer.register_buffer("lora_vera_B", pm.vera_B["default"][:t.d_out, :].clone(),
                                    persistent=False)
            t.layer.lora_lambda_d.copy_(pm.vera_lambda_d["default"])
            t.layer.lora_lambda_b.copy_(pm.vera_lambda_b["default"])
    ours, theirs = testing.logits(model, batch), testing.logits(peft_model, batch)
    return {"targets": len(state.targets),
            "peft_identity_err": identity,
            "adapter_effect (max |logits - base|)": (theirs - base).abs().max().item(),
            "parity_max_abs_err": (ours - theirs).abs().max().item(),
            "parity_rel_err": ((ours - theirs).norm() / (theirs - base).norm()).item()}


def sharing():
    model = testing.tiny_llama()
    state = ll.attach(model, ll.config("vera", r=R, target_names=[f"{n}$" for n in PROJ]))
    pairs = {(id(t.layer.lora_vera_A), id(t.layer.lora_vera_B)) for t in state.targets}
    return {"targets": len(state.targets), "distinct (A, B) pairs in memory": len(pairs),
            "A/B in state_dict": sum("vera_A" in k or "vera_B" in k for k in model.state_dict())}


def main():
    print(f"lora-lite {ll.__version__}, torch {torch.__version__}; vera from: {ensure_plugin()}")
    batch = testing.make_batch()
    print("\nPEFT parity (fp32, PEFT's lambdas and A/B slices copied into lora-lite's adapter):")
    for k, v in peft_parity(batch).items():
        print(f"  {k:40s} {v:.3g}" if isinstance(v, float) else f"  {k:40s} {v}")
    print("\nprojection sharing:")
    for k, v in sharing().items():
        print(f"  {k:40s} {v}")
    cfg = ll.config("vera", r=R, target_names=[f"{n}$" for n in PROJ])
    bases = {"fp32": testing.tiny_llama,
             "4bit": lambda: testing.quantize(testing.tiny_llama(), "4bit"),
             "8bit": lambda: testing.quantize(testing.tiny_llama(), "8bit")}
    figs = {name: testing.measure_invariants(make, cfg, batch) for name, make in bases.items()}
    print("\ninvariants (design.md §4; measure_invariants, 3 AdamW steps, lr 1e-2):")
    keys = [k for k in figs["fp32"] if k != "file_keys"] + ["file_has_A_or_B"]
    for f in figs.values():
        f["file_has_A_or_B"] = any("vera_A" in k or "vera_B" in k for k in f["file_keys"])
    print(f"  {'figure':24s}" + "".join(f"{name:>14s}" for name in figs))
    for k in keys:
        cells = [figs[name][k] for name in figs]
        print(f"  {k:24s}" + "".join(f"{c:>14.3g}" if isinstance(c, float) else f"{str(c):>14s}"
                                     for c in cells))


if __name__ == "__main__":
    main()
