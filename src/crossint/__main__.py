import sys

from crossint.cli import main

sys.exit(main())
