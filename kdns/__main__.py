"""``python -m kdns`` is the ``kdns`` command."""
import sys

from kdns.cli import main

sys.exit(main())
