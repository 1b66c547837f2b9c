"""Merge / PEFT export / PEFT import figures for every installed variant (the README table).

    .venv/bin/python benchmarks/interop_figures.py [--json out.json]

Tiny random Llama (hidden 64, 2 layers, fp32), each adapter filled with random values (the rows
of tests/interop_cases.py). Columns, all max relative logit errors unless said otherwise:
  merge fp32          ll.merge vs the attached adapter
  requant 4bit/8bit   ll.merge on a bnb base: max per-layer requantization error of W'
                      (max|Q(W') - W'| / max|W'|)
  peft native         PEFT's PeftModel.from_pretrained of ll.export_peft vs lora-lite
  as_lora full rank   the same for ll.export_peft(as_lora_rank=64) (plain LoRA)
  import              ll.load of a PEFT-written folder (random values) vs PEFT
"""
import argparse
import json
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from interop_cases import THIRD_PARTY, THIRD_PARTY_SRC, adapted_model, installed, rel_err  # noqa: E402

import lora_lite as ll  # noqa: E402
import lora_lite.plugins as plugins  # noqa: E402
from lora_lite.testing import logits, make_batch, quantize, same_kernel_logits, tiny_llama  # noqa: E402

BATCH = make_batch()


def peft_import_configs(peft):
    qv = ["q_proj", "v_proj"]
    return {
        "lora": peft.LoraConfig(r=4, lora_alpha=8, target_modules=qv),
        "dora": peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, target_modules=qv),
        "ia3": peft.IA3Config(target_modules=["k_proj", "v_proj"], feedforward_modules=[]),
        "ia3_ff": peft.IA3Config(target_modules=["down_proj"], feedforward_modules=["down_proj"]),
        "hra": peft.HRAConfig(r=4, target_modules=qv),
        "road": peft.RoadConfig(variant="road_2", group_size=32, target_modules=qv),
        "delora": peft.DeloraConfig(r=4, target_modules=qv),
        "vera": peft.VeraConfig(r=8, target_modules=qv, save_projection=True),
        "oft": peft.OFTConfig(r=0, oft_block_size=16, target_modules=qv),
        "boft": peft.BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=qv),
    }


def merge_errors(name):
    model, _ = adapted_model(name)
    adapted = logits(model, BATCH)
    ll.merge(model)
    row = {"merge_fp32": rel_err(logits(model, BATCH), adapted)}
    for kind in ("4bit", "8bit"):
        model, _ = adapted_model(name, make_model=lambda kind=kind: quantize(tiny_llama(), kind))
        adapted = same_kernel_logits(model, BATCH)
        report = ll.merge(model)
        row[f"requant_{kind}"] = report["max_write_error"]
        row[f"merged_logits_{kind}"] = rel_err(same_kernel_logits(model, BATCH), adapted)
    return row


def export_errors(name, peft):
    row = {}
    model, _ = adapted_model(name)
    ours = logits(model, BATCH)
    with tempfile.TemporaryDirectory() as d:
        variant = ll.get_variant(name)
        if callable(getattr(variant, "peft_config", None)) and \
                variant.peft_config(ll.attached(model).cfg, ["x"]) is not None:
            ll.export_peft(model, d)
            row["peft_native"] = rel_err(logits(peft.PeftModel.from_pretrained(tiny_llama(), d), BATCH), ours)
        report = ll.export_peft(model, os.path.join(d, "svd"), as_lora_rank=64)
        loaded = peft.PeftModel.from_pretrained(tiny_llama(), os.path.join(d, "svd"))
        row["as_lora_full_rank"] = rel_err(logits(loaded, BATCH), ours)
        row["as_lora_svd_error"] = report["max_relative_error"]
    return row


def import_error(name, config, peft):
    model = peft.get_peft_model(tiny_llama(), config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    expected = logits(model.eval(), BATCH)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        ours = tiny_llama()
        ll.load(ours, d)
        assert ll.attached(ours).cfg.variant == name
        return rel_err(logits(ours, BATCH), expected)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    import peft
    if THIRD_PARTY not in ll.variants():
        sys.path.insert(0, THIRD_PARTY_SRC)
        from lora_lite_vera import plugin
        plugins.register_plugin(plugin, name="interop-vera", distribution="lora-lite-vera (source)")
    imports = peft_import_configs(peft)
    rows = {}
    for name in installed():
        row = {**merge_errors(name), **export_errors(name, peft)}
        if name in imports and name in ll.variants():
            row["import"] = import_error(name, imports[name], peft)
        rows[name] = row
        print(name, {k: f"{v:.1e}" for k, v in row.items()}, flush=True)
    cols = ["merge_fp32", "requant_4bit", "requant_8bit", "peft_native", "as_lora_full_rank", "import"]
    print("\n| variant | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols))
    for name, row in rows.items():
        print(f"| {name} | " + " | ".join(f"{row[c]:.1e}" if c in row else "-" for c in cols) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "peft": peft.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
