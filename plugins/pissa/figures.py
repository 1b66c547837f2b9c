"""Print PiSSA's figures for issue 3 (tiny_llama, r=4, alpha=8 on q_proj/v_proj, 3 AdamW steps at
lr 1e-2; identity error = max |logit difference| against the base at init on make_batch()).

    python plugins/pissa/figures.py
"""
import importlib.util
import os
import warnings

warnings.filterwarnings("ignore")
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("test_pissa", os.path.join(_here, "tests", "test_pissa.py"))
t = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(t)

SETTINGS = [  # (base, config knobs, label)
    ("fp32", {}, "default"),
    ("4bit", {"quant_iters": 0}, "requantized W_res, no refit"),
    ("4bit", {}, "requantized W_res, 1 refit (default)"),
    ("4bit", {"quant_iters": 5}, "requantized W_res, 5 refits"),
    ("4bit", {"rewrite_base": False}, "implicit residual"),
    ("8bit", {"quant_iters": 0}, "requantized W_res, no refit"),
    ("8bit", {}, "requantized W_res, 1 refit (default)"),
    ("8bit", {"quant_iters": 5}, "requantized W_res, 5 refits"),
    ("8bit", {"rewrite_base": False}, "implicit residual"),
]


def main():
    print("pissa  (r=4, alpha=8, fp32 adapter math)")
    print(f"{'base':5} {'setting':38} {'identity_err':>12} {'resid_err':>10} {'reload_err':>10} "
          f"{'trainable':>9} {'file_bytes':>10} {'detach_bitexact':>15}")
    for kind, knobs, label in SETTINGS:
        out = t.invariants(kind, **knobs)
        resid = t.residual_error(kind, **knobs) if knobs.get("rewrite_base", True) else 0.0
        print(f"{kind:5} {label:38} {out['identity_err']:12.3g} {resid:10.3g} {out['reload_err']:10.3g} "
              f"{out['trainable']:9d} {out['file_bytes']:10d} {str(out['detach_bitexact']):>15}")
    print("resid_err = ||W - Q(W_res) - s·B A||_F / ||W||_F at init (W: the dequantized base weight)")
    d = t.init_diff()
    print(f"PEFT init_lora_weights='pissa' vs ours at init (fp32, max abs diff): A {d['A']:.3g}, "
          f"B {d['B']:.3g} (up to SVD sign), residual {d['residual']:.3g}, logits {d['logits']:.3g}")
    print(f"PEFT parity (same trained A, B and residual; fp32 logits max abs diff): {t.peft_parity_err():.3g}")


if __name__ == "__main__":
    main()
