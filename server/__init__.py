"""The aiohttp application: settings, container, middleware, REST v1, the gateway, the CLI."""

import sys

RECURSION_LIMIT = 1000
"""Python's default. Importing py_ecc (with web3) raises the limit to 100 000 and py-evm (the devnet) to
12 288, far past what the C stack holds: a parser's recursion guard would then fire only after a
segfault. ``keep_recursion_limit()`` puts it back after those imports (server/app.py: in ``create_app``
and once the app has started)."""


def keep_recursion_limit() -> None:
    if sys.getrecursionlimit() != RECURSION_LIMIT:
        sys.setrecursionlimit(RECURSION_LIMIT)
