"""The `oes-fast` command (entry point `oes_fast.cli:main`): one module per subcommand
(restore, search, compare, inspect) and their shared pieces in `common`."""
from .common import UsageError
from .main import build_parser, main

__all__ = ["main", "build_parser", "UsageError"]
