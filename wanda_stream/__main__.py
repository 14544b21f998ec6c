"""`python -m wanda_stream` is the same as the `wanda-stream` command."""

import sys

from wanda_stream.cli import main

sys.exit(main())
