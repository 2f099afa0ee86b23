import sys

from tidar.cli import main

sys.exit(main())
