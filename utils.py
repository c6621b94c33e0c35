"""Small helpers shared by the model and the command line: errors and paths."""

import os


class UserError(Exception):
    """Something the user can fix (a flag, a folder, a file): shown as one line, no traceback."""


def check_folder(path):
    """Creates `path` (and parents) if missing; returns it."""
    os.makedirs(path, exist_ok=True)
    return path
