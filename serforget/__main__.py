"""``python -m serforget`` runs the ``serforget`` CLI."""

import sys

from serforget.cli import main

sys.exit(main())
