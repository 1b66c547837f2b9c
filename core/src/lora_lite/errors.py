"""Exceptions raised by lora-lite. All derive from ``LoraLiteError`` and from the builtin type a
caller would expect (ValueError, KeyError, ...), so plain ``except ValueError`` keeps working."""


class LoraLiteError(Exception):
    """Base class of every lora-lite error."""


class ConfigError(LoraLiteError, ValueError):
    """A config field has a bad value; the message names the field."""


class VariantNotInstalled(LoraLiteError, KeyError):
    """The requested variant is not provided by any loaded plugin."""

    def __str__(self):  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class AttachError(LoraLiteError, RuntimeError):
    """attach/detach could not be done; the model was left as it was."""


class CalibrationError(LoraLiteError, ValueError):
    """A data-initialised variant got no (or empty) calibration data; the model was not changed."""


class AdapterFileError(LoraLiteError, ValueError):
    """An adapter file cannot be loaded onto this model; the model was not touched."""


class AdapterSaveError(LoraLiteError, OSError):
    """``ll.save`` could not write the adapter file; any previous file at that path is intact.
    The message names the path asked for (never the temporary file)."""

    def __str__(self):  # OSError would prefix "[Errno N]"
        return str(self.strerror if self.strerror is not None else super().__str__())


class VariantContractError(LoraLiteError, TypeError):
    """A plugin's variant breaks the variant contract (docs/plugin-contract.md)."""
