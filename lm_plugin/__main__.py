"""``python -m lm_plugin`` = the ``lm-plugin`` command."""

import sys

from .cli import main

sys.exit(main())
