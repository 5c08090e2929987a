"""The application's error for bad user input; the CLI turns it into one message and exit status 2."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input (files, folders, options, checkpoints). The CLI prints the message and exits with status 2."""
