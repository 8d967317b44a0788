"""``python -m timm_remem``: the ``timm-remem`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
