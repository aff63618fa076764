"""Ember's command line, shared by every entry point: one parser, one error type, one way to print an error.

    from cli import ConfigError, parse_args, report_error

    @dataclass
    class Arguments:
        model: str = field(default="", metadata={"help": "checkpoint folder"})
        window: int = 512

    def main(argv=None) -> int:
        try:
            (args,) = parse_args((Arguments,), argv, prog="python -m something", path_keys=("model",))
        except ConfigError as err:
            return report_error(err)       # `error: window: expected an integer, got 2.5`, on rank 0 only

The rules are in `cli/parser.py`'s docstring.
"""

from .files import file_mode, folder_mode, honour_umask
from .parser import (
    INTERRUPTED,
    ConfigError,
    build,
    convert,
    dotted_items,
    error_line,
    fields_of,
    help_text,
    is_main_process,
    parse_args,
    read_yaml_mapping,
    report_error,
    set_dotted,
    warn,
)

__all__ = ["INTERRUPTED", "ConfigError", "build", "convert", "dotted_items", "error_line", "fields_of", "file_mode",
           "folder_mode", "help_text", "honour_umask", "is_main_process", "parse_args", "read_yaml_mapping",
           "report_error", "set_dotted", "warn"]
