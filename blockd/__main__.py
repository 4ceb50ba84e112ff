"""`python -m blockd`, as the `blockd` command (blockd.main)."""

from blockd.main import main

main()
