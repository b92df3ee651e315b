"""models/anydressing/: registered with ComfyUI's own folder functions, listed for the loader's choices."""

from __future__ import annotations

import os
from typing import Optional

import folder_paths

FOLDER = "anydressing"


def register_model_folder() -> None:
    """models/anydressing/, added with ComfyUI's own add_model_folder_path: the paths (and the extension set) a
    user's extra_model_paths.yaml gave under that name stay as they are."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    try:  # created up front so a user sees where AnyDressing files go (a read-only install simply skips it)
        os.makedirs(default, exist_ok=True)
    except OSError:
        pass
    folder_paths.add_model_folder_path(FOLDER, default)


def model_files() -> list[str]:
    """The weight files in the anydressing folders (a training run's .losses.csv beside its file is not one)."""
    extensions = tuple(folder_paths.supported_pt_extensions)
    return [n for n in folder_paths.get_filename_list(FOLDER) if n.lower().endswith(extensions)]


def full_path(name: str) -> Optional[str]:
    """What ComfyUI's own lookup finds for `name` (only that is ever opened); None when it finds nothing."""
    return folder_paths.get_full_path(FOLDER, name)


def expected_path(name: str) -> str:
    """Where a file of that name would be (for the message when it is missing)."""
    return os.path.join(folder_paths.get_folder_paths(FOLDER)[0], name)


_EXTRA_OK: dict[tuple[str, float, int], bool] = {}  # (path, mtime, size) -> holds only Dressing-Attention weights


def extra_weights_files() -> list[str]:
    """Files of models/anydressing/ that hold only Dressing-Attention weights (e.g. ip_layer.pth).

    Read by key names only (no tensor data) and remembered per file version, so the editor's node list stays fast.
    """
    from ..anydressing_core.formats import FormatError, holds_only_dressing_weights, read_keys

    found = []
    for name in model_files():
        path = full_path(name)
        try:
            st = os.stat(path)
        except (OSError, TypeError):
            continue
        key = (path, st.st_mtime, st.st_size)
        if key not in _EXTRA_OK:
            try:
                _EXTRA_OK[key] = holds_only_dressing_weights(*read_keys(path))
            except FormatError:
                _EXTRA_OK[key] = False
        if _EXTRA_OK[key]:
            found.append(name)
    return found
