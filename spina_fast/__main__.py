import sys

from spina_fast.cli import main

sys.exit(main())
