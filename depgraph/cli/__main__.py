"""``python -m depgraph.cli`` (and ``accelerate launch -m depgraph.cli``)."""
import sys

from depgraph.cli import main

sys.exit(main())
