"""python -m cancernet COMMAND: the commands are cancernet/cli/."""

import sys

from cancernet.cli import main
from cancernet.runtime.console import main_guard

if __name__ == "__main__":  # loader workers re-run this module's top level: they must not run a command
    sys.exit(main_guard(main))
