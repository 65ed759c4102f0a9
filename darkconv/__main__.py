"""``python -m darkconv``: the same as the ``darkconv`` command."""
from .cli import main

main(prog_name="darkconv")
