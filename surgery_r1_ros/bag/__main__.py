"""``python -m surgery_r1_ros.bag ACTION ...``: the ``surgery-r1 bag`` commands with a quicker start-up
(only the bag tools are loaded, not every subsystem's command-line options)."""

import sys

from surgery_r1_ros import cli

if __name__ == "__main__":
    cli.COMMAND_MODULES = ("surgery_r1_ros.bag.commands",)
    sys.exit(cli.main(["bag", *sys.argv[1:]]))
