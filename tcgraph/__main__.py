import sys

from tcgraph.cli import main

sys.exit(main())
