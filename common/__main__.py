"""``python -m common`` runs the ``serforget`` CLI."""

import sys

from common.cli import main

sys.exit(main())
