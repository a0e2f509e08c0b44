"""``python -m dynamo_rt``: same as the ``dynamo-rt`` console script."""

import sys

from dynamo_rt.cli import main

sys.exit(main())
