"""`python -m aefeatures` = the `aefeatures` command."""

from aefeatures.cli import main

main()
