"""Writing an export folder so that nothing is lost: the export is written into a fresh hidden
folder next to ``--output`` and renamed into place only when complete, so an interrupted or
failed export leaves ``--output`` as it was (no half folder that loads as if complete). A
non-empty ``--output`` is refused unless ``overwrite``; then its previous contents are moved
aside to ``<output>.previous-N`` (kept, never deleted) before the new folder takes its name."""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile


class ExportFolderError(FileExistsError):
    """A one-line reason why the export folder cannot be written."""


def check_output(output, overwrite: bool) -> None:
    """Before anything is loaded: ``output`` is absent, an empty folder, or (``overwrite``) a
    folder whose contents will be moved aside."""
    output = os.fspath(output)
    if os.path.lexists(output) and not os.path.isdir(output):
        raise ExportFolderError(f"--output {output}: exists and is not a folder")
    if os.path.isdir(output) and os.listdir(output) and not overwrite:
        raise ExportFolderError(f"--output {output}: the folder is not empty; choose a new folder, "
                                "or pass --overwrite (its contents are then moved aside to "
                                f"{os.path.basename(output.rstrip(os.sep))}.previous-N, never deleted)")


def _aside_name(output) -> str:
    n = 1
    while os.path.lexists(f"{output}.previous-{n}"):
        n += 1
    return f"{output}.previous-{n}"


@contextlib.contextmanager
def staged_folder(output, overwrite: bool):
    """Yield a temporary folder to write into; on success it becomes ``output`` (the previous
    contents moved aside and the path of that returned via ``.aside``), on failure it is
    removed and ``output`` is untouched."""
    output = os.path.abspath(os.fspath(output)).rstrip(os.sep)
    check_output(output, overwrite)
    parent = os.path.dirname(output)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.export-", dir=parent)
    stage = Staged(tmp)
    try:
        yield stage
        check_output(output, overwrite)  # still as checked (nobody wrote there meanwhile)
        if os.path.isdir(output):
            if os.listdir(output):
                stage.aside = _aside_name(output)
                os.rename(output, stage.aside)
            else:
                os.rmdir(output)
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder, nothing else
        raise


class Staged:
    def __init__(self, path):
        self.path, self.aside = path, None
