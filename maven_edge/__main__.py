"""`python -m maven_edge` is the `maven-edge` command."""

import sys

from maven_edge.cli import main

sys.exit(main())
