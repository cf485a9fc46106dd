import sys

from hwcompat.cli import main

sys.exit(main())
