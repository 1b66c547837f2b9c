"""docs/models.md's table of what the default targets adapt on each tiny architecture is the
measured one (``lora_lite.testing.arch_matrix.placement``). Regenerate it with
``python tests/test_models_doc.py`` and paste it between the markers."""
import pathlib

from lora_lite.testing.arch_matrix import placement
from lora_lite.testing.tiny_models import ARCHS

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "models.md"
BEGIN, END = "<!-- placement table: begin -->", "<!-- placement table: end -->"


def table() -> str:
    rows = ["| architecture | kind | adapted by default (all-linear) | layers | left out by default |",
            "|---|---|---|---|---|"]
    for name in sorted(ARCHS):
        m = placement(name, "lora")
        left = ", ".join(f"{k} {v}" for k, v in m["left_out"].items()) or "nothing"
        rows.append(f"| {name} | {ARCHS[name].kind} | {' '.join(m['adapted'])} | {m['layers']} "
                    f"| {left} |")
    return "\n".join(rows)


def test_the_docs_table_is_the_measured_one():
    text = DOC.read_text()
    assert BEGIN in text and END in text
    assert text.split(BEGIN)[1].split(END)[0].strip() == table()


def test_placement_sees_what_is_left_out():
    moe = placement("mixtral", "lora")
    assert moe["left_out"]["fused experts"] == 2 and "q_proj" in moe["adapted"]
    whisper = placement("whisper", "lora")
    assert whisper["left_out"]["convolutions"] == 2 and "fused experts" not in whisper["left_out"]


if __name__ == "__main__":
    print(table())
