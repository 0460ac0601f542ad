"""`python -m shmmmu.workers.cli`: the `shmmmu` command, as its console script runs it."""
from shmmmu.workers.cli import main

main()
