"""``python -m fastsam.affect``: see :mod:`fastsam.affect.cli`."""
import sys

from fastsam.affect.cli import main

sys.exit(main())
