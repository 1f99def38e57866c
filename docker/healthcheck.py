"""Container HEALTHCHECK: exit 0 when the server's /healthz answers 200, else 1 (standard library only)."""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("XPEFT_PORT", "8000")
    url = os.environ.get("XPEFT_HEALTHCHECK_URL", f"http://127.0.0.1:{port}/healthz")
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 - a fixed local URL
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"healthcheck {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
