import sys

from blockemu.cli.main import main

sys.exit(main())
