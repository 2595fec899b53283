"""``python -m danlu`` is the ``danlu`` command (also under torchrun)."""

import sys

from danlu.app.cli import main

sys.exit(main())
