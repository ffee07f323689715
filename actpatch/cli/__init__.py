"""The ``actpatch`` command line (typer + rich); ``main`` is the console script's entry point.

``main`` turns usage errors into one line on stderr and exit code 2; the commands themselves turn
failures into one line and exit code 1 (``--debug`` prints the traceback).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

try:  # typer >= 0.26 vendors click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on click
    from click.exceptions import ClickException, NoArgsIsHelpError, UsageError

from .app import EXIT_USAGE, app, error_line


def main(argv: Sequence[str] | None = None) -> None:
    """Run the CLI with ``argv`` (default: sys.argv[1:]) and exit with its status."""
    import typer

    args = list(sys.argv[1:] if argv is None else argv)
    command = typer.main.get_command(app)
    try:
        code = command.main(args=args, prog_name="actpatch", standalone_mode=False)
    except NoArgsIsHelpError as e:
        print(e.format_message())
        code = EXIT_USAGE
    except UsageError as e:
        where = f"actpatch {e.ctx.info_name}" if e.ctx and e.ctx.info_name != "actpatch" else "actpatch"
        print(error_line(f"{e.format_message()} (see `{where} --help`)"), file=sys.stderr)
        code = EXIT_USAGE
    except ClickException as e:
        print(error_line(e.format_message()), file=sys.stderr)
        code = e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print(error_line("aborted"), file=sys.stderr)
        code = 130
    sys.exit(code if isinstance(code, int) else 0)


__all__ = ["app", "main"]
