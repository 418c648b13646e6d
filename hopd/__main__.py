import sys

from hopd.cli import main

sys.exit(main())
