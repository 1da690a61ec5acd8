"""`python -m trtbuild` runs the CLI."""

from trtbuild.cli import main

main()
