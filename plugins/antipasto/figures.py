"""Print the AntiPaSTO family's figures as a table (tiny random Llama, q_proj/v_proj, r = 8).

    python plugins/antipasto/figures.py        (OMP_NUM_THREADS=1 is faster on a busy machine)

Per variant: identity error at init and reload error (max |logit diff|, fp32), identity error at
init on nf4 and int8 bases with the residual requantized (the default) and with the base kept
(rewrite_base=False), the residual's requantization error (max |W - (Q(W_res) + U S Vh)| / max|W|
over the targets), the reload error after a calibrated re-selection, and the trainable count.
"""
import warnings

import lora_lite as ll
from lora_lite.testing import logits, make_batch, measure_invariants, quantize, same_kernel_logits, \
    tiny_llama
from lora_lite_antipasto import residual_error

warnings.filterwarnings("ignore")

TARGETS = [r"q_proj$", r"v_proj$"]
CASES = [
    ("antipasto", {}),
    ("antipasto_rot", {"block_size": 4}),
    ("antipasto_rot", {"block_size": 4, "rotate_basis": "both"}),
    ("antipasto_arrow", {"block": 2}),
]
MAKERS = {"fp32": tiny_llama, "4bit": lambda: quantize(tiny_llama(), "4bit"),
          "8bit": lambda: quantize(tiny_llama(), "8bit")}


def calibration():
    return [make_batch(seed=10 + i, batch=2, seq=16, pad_first=5) for i in range(2)]


def max_residual_error(kind, cfg):
    model = MAKERS[kind]()
    ll.attach(model, cfg)
    return max(residual_error(m) for m in model.modules() if hasattr(m, "_lora_variant"))


def row(name, knobs):
    cfg = lambda **kw: ll.config(name, r=8, target_names=TARGETS, **knobs, **kw)
    batch = make_batch()
    fp32 = measure_invariants(MAKERS["fp32"], cfg(), batch)
    calibrated = measure_invariants(MAKERS["fp32"], cfg(), batch, calibration_data=calibration())
    out = {"variant": name + "".join(f" {k}={v}" for k, v in knobs.items()),
           "id fp32": fp32["identity_err"], "reload fp32": fp32["reload_err"],
           "reload calib": calibrated["reload_err"]}
    for kind in ("4bit", "8bit"):
        out[f"id {kind}"] = measure_invariants(MAKERS[kind], cfg(), batch)["identity_err"]
        out[f"id {kind} kept"] = measure_invariants(
            MAKERS[kind], cfg(rewrite_base=False), batch)["identity_err"]
        out[f"W_res err {kind}"] = max_residual_error(kind, cfg())
    out["trainable"] = fp32["trainable"]
    return out


def main():
    rows = [row(name, knobs) for name, knobs in CASES]
    cols = list(rows[0])
    fmt = lambda v: v if isinstance(v, str) else (f"{v:d}" if isinstance(v, int) else f"{v:.2e}")
    widths = [max(len(c), *(len(fmt(r[c])) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(fmt(r[c]).ljust(w) for c, w in zip(cols, widths)))
    batch = make_batch()
    reference = logits(tiny_llama(), batch)
    for kind in ("4bit", "8bit"):
        err = (same_kernel_logits(MAKERS[kind](), batch) - reference).abs().max().item()
        print(f"context: quantizing the fp32 model to {kind} moves its logits by {err:.2e}")


if __name__ == "__main__":
    main()
