"""``python -m featinv.cli`` (and ``accelerate launch -m featinv.cli``): the ``featinv`` command."""

import sys

from featinv.cli import main

sys.exit(main())
