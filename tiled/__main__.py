import sys

from tiled.cli import main

sys.exit(main())
