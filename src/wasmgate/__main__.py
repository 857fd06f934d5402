import sys

from wasmgate.cli import main

sys.exit(main())
