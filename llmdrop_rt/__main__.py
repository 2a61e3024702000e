"""`python -m llmdrop_rt <command>`: see llmdrop_rt.cli."""
from .cli import main

main()
