"""Print the issue-4 figures for road (road_1, road_2, road_4) on the tiny test Llama.

    python plugins/road/figures.py

Uses the setups and PEFT parity check of tests/test_road.py (loaded from there).
"""
import importlib.util
import logging
import pathlib
import warnings

import lora_lite as ll
from lora_lite.testing import make_batch, measure_invariants

warnings.filterwarnings("ignore")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # its per-call 8-bit cast notice
_spec = importlib.util.spec_from_file_location(
    "road_tests", pathlib.Path(__file__).parent / "tests" / "test_road.py")
T = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(T)


def main():
    header = ("variant", "targets", "identity fp32", "PEFT parity", "reload fp32",
              "identity 4bit", "identity 8bit", "reload 4bit", "reload 8bit", "trainable")
    rows = []
    for road_variant in T.VARIANTS:
        cfg = ll.config("road", **T.kwargs(road_variant))
        m = {base: measure_invariants(lambda: T.make_model(base), cfg, make_batch(), lr=5e-2)
             for base in ("fp32", "4bit", "8bit")}
        parity, _ = T.peft_parity_error(road_variant)
        rows.append((f"road {road_variant} g={T.GROUP}", "q_proj/v_proj",
                     f"{m['fp32']['identity_err']:.1e}", f"{parity:.1e}",
                     f"{m['fp32']['reload_err']:.1e}", f"{m['4bit']['identity_err']:.1e}",
                     f"{m['8bit']['identity_err']:.1e}", f"{m['4bit']['reload_err']:.1e}",
                     f"{m['8bit']['reload_err']:.1e}", str(m["fp32"]["trainable"])))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for r in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    print("\nerrors: max |logit difference| on tiny_llama (hidden 64, 2 layers), make_batch(); "
          "PEFT parity on the same shape with random biases, fp32, random θ and α")


if __name__ == "__main__":
    main()
