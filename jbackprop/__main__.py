"""``python -m jbackprop check|train|bench``: the same as the ``jbackprop`` command."""
import sys

from jbackprop.cli import main

sys.exit(main())
