import sys

from kustody.cli import main

sys.exit(main())
