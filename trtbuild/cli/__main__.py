"""`python -m trtbuild.cli` runs the CLI."""

from trtbuild.cli import main

main()
