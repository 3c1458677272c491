"""`python -m hubsync`."""

from hubsync.cli import main

main()
