"""`python -m aefeatures` = the `aefeatures` command."""

from aefeatures.cli.app import main

main()
