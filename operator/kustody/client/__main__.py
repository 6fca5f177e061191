"""``python -m kustody.client``: ``kustody unwrap`` without the operator's dependencies."""

import sys

from kustody.client.commands import main

sys.exit(main())
