"""Where the driver touches another library's private code: one module per library, each naming
the version it was written for (`WRITTEN_FOR`); `tests/unit/test_compat.py` fails, naming the patch,
when the installed version differs."""
