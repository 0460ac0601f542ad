"""The programs: the `shmmmu` command and the worker processes, installed as `shmmmu.workers`.

The folder is the checkout's workers/; pyproject.toml maps the package name
shmmmu.workers onto it, so an install adds only `shmmmu` to site-packages.
Every process starts as `python -m shmmmu.workers.X` (shmmmu.spawn).
"""
