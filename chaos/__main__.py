"""``python -m chaos`` (``./dev chaos``): the chaos soak; see chaos/soak.py."""

import sys

from chaos.soak import main

sys.exit(main())
