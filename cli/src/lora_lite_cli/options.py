"""Options shared by several commands, declared once (the same spelling and help everywhere),
and ``MultiValueCommand``: a command whose ``MULTI_VALUE_OPTIONS`` take space-separated values."""
from __future__ import annotations

import typer

# options that take several values: `--variants a b` is read as `--variants a --variants b`
MULTI_VALUE_OPTIONS = ("--variants",)


def variant_option(default=None):
    return typer.Option(default, "--variant", "-v", help="Adapter variant (see `lora-lite variants`).")


def model_option(default=None, help_extra=""):
    return typer.Option(default, "--model", "-m", help="'smollm2' (embedded default), a local "
                        "model folder, a .gguf file or a hub id" + help_extra + ".")


def targets_option():
    return typer.Option(None, "--targets", "-t", help="Regex on layer names, repeatable "
                        "(default: the variant's own targets).")


def rank_option():
    return typer.Option(None, "--rank", "-r", help="Rank r (default: the variant's).")


def layers_option():
    return typer.Option(None, "--layers", help="Blocks to adapt: 0,1,5 or 0-3 or all (default: all).")


def sets_option(example="--set block=8"):
    return typer.Option(None, "--set", help=f"A variant knob, knob=value, repeatable (e.g. {example}).")


def dtype_option(default="float32"):
    return typer.Option(default, "--dtype", show_default=False, help="Storage dtype of the base model: "
                        "float32, bfloat16, float16; adapter tensors stay float32 in train (default: float32).")


def quantize_option():
    return typer.Option(None, "--quantize", help="Quantize the base with bitsandbytes: 4bit (nf4) or 8bit.")


QUANTIZE_KINDS = ("4bit", "8bit")


def check_quantize(value):
    """``value`` of --quantize when it is None, 4bit or 8bit; else the one-line usage error (exit 2)."""
    if value not in (None, *QUANTIZE_KINDS):
        from .errors import CLIError
        raise CLIError(f"--quantize {value!r}: expected 4bit or 8bit", 2)
    return value


def threads_option():
    return typer.Option(None, "--threads", help="CPU threads for torch (default: one per core "
                        "not busy with other work).")


def json_option(what="the results"):
    return typer.Option(False, "--json", help=f"Print {what} as JSON on stdout.")


def expand_multi_values(argv: list[str]) -> list[str]:
    """['--variants', 'a', 'b', '--json'] -> ['--variants', 'a', '--variants', 'b', '--json']:
    the README's space-separated spelling; 'a,b' and repeating the option also work."""
    out, current = [], None
    for arg in argv:
        if arg == "--":
            current = None
        elif arg.startswith("-"):
            current = arg if arg in MULTI_VALUE_OPTIONS else None
        elif current is not None and out and out[-1] != current:
            out.append(current)
        out.append(arg)
    return out


def _multi_value_command_class():
    from typer.core import TyperCommand

    class MultiValueCommand(TyperCommand):
        """A command whose MULTI_VALUE_OPTIONS take space-separated values."""

        def parse_args(self, ctx, args):
            return super().parse_args(ctx, expand_multi_values(list(args)))
    return MultiValueCommand


MultiValueCommand = _multi_value_command_class()


def default_targets_text() -> str:
    """The default targets, ``lora_lite.targets.DEFAULT_TARGET_NAMES``, as help texts write them."""
    from lora_lite.targets import DEFAULT_TARGET_NAMES
    return " and ".join(DEFAULT_TARGET_NAMES)
