"""Print DoRA's figures for issue 3 (tiny_llama, r=4, alpha=8 on q_proj/v_proj, 3 AdamW steps at
lr 1e-2; identity error = max |logit difference| against the base at init on make_batch()).

    python plugins/dora/figures.py
"""
import importlib.util
import os
import warnings

warnings.filterwarnings("ignore")
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("test_dora", os.path.join(_here, "tests", "test_dora.py"))
t = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(t)

SETTINGS = [("fp32", True), ("4bit", True), ("8bit", True), ("4bit", False), ("8bit", False)]


def main():
    print("dora  (r=4, alpha=8, fp32 adapter math)")
    print(f"{'base':5} {'dense W':15} {'identity_err':>12} {'reload_err':>10} {'trainable':>9} "
          f"{'file_bytes':>10} {'detach_bitexact':>15}")
    for kind, cache in SETTINGS:
        out = t.invariants(kind, cache_weight=cache)
        label = "cached" if cache else "read each fwd"
        print(f"{kind:5} {label:15} {out['identity_err']:12.3g} {out['reload_err']:10.3g} "
              f"{out['trainable']:9d} {out['file_bytes']:10d} {str(out['detach_bitexact']):>15}")
    base, ours, theirs, m_err = t.peft_pair()
    batch = t.make_batch()
    err = (t.logits(ours, batch) - t.logits(theirs, batch)).abs().max().item()
    print(f"PEFT use_dora=True, magnitude init vs ours (fp32, max abs diff): {m_err:.3g}")
    print(f"PEFT parity (same trained A, B, m; q/v with a bias; fp32 logits max abs diff): {err:.3g}")


if __name__ == "__main__":
    main()
