"""`python -m llmc`: the `llmc` command."""

from llmc.cli import main

main(prog_name="llmc")
