import sys

from takd.cli import main

sys.exit(main())
