"""`python -m eva_open_clip`: the same program as the `eva-open-clip` command."""
import sys

from .cli import main

sys.exit(main())
