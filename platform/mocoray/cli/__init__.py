"""The `mocoray` command line (`main`); `python -m mocoray.cli` runs it too."""

from .parser import build_parser, main

__all__ = ["build_parser", "main"]
