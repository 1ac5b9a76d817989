"""python -m mxfp8_moe: the mxfp8-moe command."""

from .cli import main

raise SystemExit(main())
