"""``python -m frontend``: the frontend process."""

import sys

from frontend.main import main

sys.exit(main())
