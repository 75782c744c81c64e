"""C{python -m fauth}: the C{fauth} command (L{fauth.process.cli})."""
from fauth.process.cli import main

main()
