import sys

from unweight.cli import main

sys.exit(main())
