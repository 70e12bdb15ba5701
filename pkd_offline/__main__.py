import sys

from pkd_offline.cli import main

sys.exit(main())
