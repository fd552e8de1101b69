import sys

from swapvae.cli import main

sys.exit(main())
