"""The command line: argument parsing, one function per command, messages and exit codes."""

from engine.cli.commands import main

__all__ = ["main"]
