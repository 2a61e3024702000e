"""`python -m llmdrop_rt.bench`: see llmdrop_rt.bench.cli."""
from .cli import main

main()
