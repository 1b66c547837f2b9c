"""Print DeLoRA's figures for issue 3 (tiny_llama, r=4 on q_proj/v_proj, 3 AdamW steps at lr 1e-2).

    python plugins/delora/figures.py
"""
import importlib.util
import os
import warnings

warnings.filterwarnings("ignore")
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("test_delora", os.path.join(_here, "tests", "test_delora.py"))
t = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(t)


def main():
    rows = {kind: t.invariants(kind) for kind in ("fp32", "4bit", "8bit")}
    print("delora  (lambda0=15, fp32 adapter math)")
    print(f"{'base':6} {'identity_err':>13} {'reload_err':>11} {'trainable':>10} {'detach_bitexact':>16}")
    for kind, out in rows.items():
        print(f"{kind:6} {out['identity_err']:13.3g} {out['reload_err']:11.3g} {out['trainable']:10d} "
              f"{str(out['detach_bitexact']):>16}")
    print(f"PEFT parity (DeloraConfig, same A, B, λ; fp32 logits max abs diff): {t.peft_parity_err():.3g}")


if __name__ == "__main__":
    main()
