import sys

from kernmux.cli.main import main

sys.exit(main())
