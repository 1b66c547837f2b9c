"""Print EVA's figures for issue 3 (tiny_llama, r=4 on q_proj/v_proj, calibrated on 2 batches,
3 AdamW steps at lr 1e-2).

    python plugins/eva/figures.py
"""
import importlib.util
import os
import warnings

warnings.filterwarnings("ignore")
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("test_eva", os.path.join(_here, "tests", "test_eva.py"))
t = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(t)


def main():
    rows = {kind: t.invariants(kind) for kind in ("fp32", "4bit", "8bit")}
    print("eva  (calibration through the model itself, also when quantized)")
    print(f"{'base':6} {'identity_err':>13} {'reload_err':>11} {'trainable':>10} {'detach_bitexact':>16}")
    for kind, out in rows.items():
        print(f"{kind:6} {out['identity_err']:13.3g} {out['reload_err']:11.3g} {out['trainable']:10d} "
              f"{str(out['detach_bitexact']):>16}")
    err, _ = t.peft_forward_parity_err()
    print(f"PEFT forward parity (LoraConfig, same A, B; fp32 logits max abs diff): {err:.3g}")
    default_agreement, exact_err = t.peft_agreement()
    print("PEFT EVA init (rho=1, center=True, anisotropic tiny_llama):")
    print(f"  subspace agreement with PEFT's default init (mean cos^2 of principal angles): {default_agreement:.4f}")
    print(f"  max |A - A_peft| with PEFT made exact (one batch, full SVD): {exact_err:.3g}")


if __name__ == "__main__":
    main()
