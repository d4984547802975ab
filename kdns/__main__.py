"""``python -m kdns`` is the ``kdns`` command."""
import sys

from .cli import main

sys.exit(main())
