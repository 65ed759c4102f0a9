"""``python -m darkconv.cli``: the same as the ``darkconv`` command."""
from . import main

main(prog_name="darkconv")
