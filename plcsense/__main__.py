import sys

from plcsense.cli import main

sys.exit(main())
