"""The `trtbuild` command line: a thin layer over the Python API.

Each concern lives in its own module and lists its click commands in ``COMMANDS``; this module only
assembles them and turns :class:`TrtbuildError` into a one-line message with exit code 2.
"""

from __future__ import annotations

import importlib
import sys

import click

from trtbuild import __version__
from trtbuild.core import log
from trtbuild.core.errors import TrtbuildError

# One module per concern; each exposes COMMANDS: list[click.Command].
_COMMAND_MODULES = (
    "trtbuild.cli.export_cmd",
    "trtbuild.cli.calibrate_cmd",
    "trtbuild.cli.quantize_cmd",
    "trtbuild.cli.qat_cmd",
    "trtbuild.cli.plan_cmd",
    "trtbuild.cli.profile_cmd",
    "trtbuild.cli.bundle_cmd",
    "trtbuild.cli.serving_cmd",
    "trtbuild.cli.demo_cmd",
    "trtbuild.cli.fleet_cmd",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="trtbuild")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
def cli(debug: bool) -> None:
    """Export, calibrate, quantize, build, profile and ship models for TensorRT and edge devices."""
    # --debug is read by main() before click runs (it decides how errors are shown).


for _name in _COMMAND_MODULES:
    for _command in getattr(importlib.import_module(_name), "COMMANDS", []):
        cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become `error: ...` on stderr and exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    log.show_on_console()  # the library logs; the command line shows its warnings as `warning:` lines
    try:
        cli.main(args=args, prog_name="trtbuild", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("error: aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # usage errors: click's own one-liner, exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except TrtbuildError as exc:
        if debug:
            raise
        click.echo(f"error: {exc.one_line()}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
