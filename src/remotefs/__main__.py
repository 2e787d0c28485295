import sys

from remotefs.cli import main

sys.exit(main())
