"""serforget: federated, on-device machine unlearning for speech emotion recognition.

One import namespace for the whole project. The repository keeps one top-level folder per role
(``common/``, ``client/``, ``server/``, ``deploy/``); pyproject maps each into this package
(``serforget.common`` ...), so the installed wheel adds the single top-level name ``serforget``.
"""

from __future__ import annotations

import pkgutil
from importlib.metadata import PackageNotFoundError, version

# A Flower app folder (FAB) may carry its own copy of this file ahead of the installed package on
# sys.path; extending the path lets ``serforget.server`` etc. still resolve to the installed ones.
__path__ = pkgutil.extend_path(__path__, __name__)

try:
    __version__ = version("serforget")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
